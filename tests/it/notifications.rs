//! Notifications (auth on): a customer hears of each of its orders' confirmation,
//! cancellation, shipping and delivery once, whatever restarts and redeliveries
//! come between; by file (the default) on every backend, and by mail through a local
//! SMTP server started here.

use crate::support::{
    bearer, on_every_backend, sign_up, Api, Backend, Process, TestServer, PASSWORD, SETTLE,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

on_every_backend!(each_order_event_worth_a_message_is_sent_once_across_restarts);

/// A product on sale with stock, orderable by `customer` (the order service has heard
/// of it); an order of it with `token`: its id.
async fn order(customer: &Api, sku: &str, token: &str) -> String {
    let start = Instant::now();
    loop {
        let (status, placed) = customer
            .post(
                "/v1/orders",
                json!({ "lines": [{ "sku": sku, "quantity": 1, "unit_price_cents": 300 }], "payment_token": token }),
            )
            .await;
        if status == StatusCode::ACCEPTED {
            return placed["order_id"].as_str().expect("order id").to_owned();
        }
        assert!(start.elapsed() < SETTLE, "{status}: {placed}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stock(operator: &Api, sku: &str) {
    let (status, body) = operator
        .post(
            "/v1/products",
            json!({ "sku": sku, "name": "Tea", "description": "", "price_cents": 300 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    operator.restock(sku, 10).await;
}

/// The kinds of a customer's notifications, sorted, once there are `count`.
async fn kinds(api: &Api, path: &str, count: usize) -> Vec<String> {
    let page = api
        .eventually(path, &format!("{count} notifications"), |page| {
            page["items"].as_array().map(Vec::len) == Some(count)
        })
        .await;
    let mut kinds: Vec<String> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|n| n["kind"].as_str().expect("kind").to_owned())
        .collect();
    kinds.sort();
    kinds
}

/// The notifications written to the file sender's file.
fn written(server: &TestServer) -> Vec<Value> {
    let path = server.config.data_dir.join("notifications.jsonl");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect()
}

async fn each_order_event_worth_a_message_is_sent_once_across_restarts(backend: Backend) {
    let (mut server, secrets) = TestServer::secured(backend, None).await;
    let operator = bearer(&server.base, &secrets.operator);
    stock(&operator, "TEA-1").await;
    let (ada_id, ada_email, ada) = sign_up(&server, "ada").await;
    let shipped = order(&ada, "TEA-1", "tok_ok").await;
    let declined = order(&ada, "TEA-1", "tok_decline").await;
    ada.order_settles(&shipped, "confirmed").await;
    ada.order_settles(&declined, "cancelled").await;
    for step in ["dispatch", "deliver"] {
        let (status, body) = operator
            .post(&format!("/v1/shipments/{shipped}/{step}"), json!({}))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    }
    let expected = [
        "order_cancelled",
        "order_confirmed",
        "order_delivered",
        "order_shipped",
    ];
    assert_eq!(kinds(&ada, "/v1/notifications", 4).await, expected);
    let path = format!("/v1/notifications?customer_id={ada_id}");
    assert_eq!(kinds(&operator, &path, 4).await, expected);
    let (_, _, bob) = sign_up(&server, "bob").await;
    let (status, page) = bob.get("/v1/notifications").await;
    assert_eq!((status, page["items"].clone()), (StatusCode::OK, json!([])));
    let (status, _) = bob.get(&path).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "another customer's");
    let lines = written(&server);
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert!(lines.iter().all(|line| line["email"] == ada_email.as_str()));

    // Killed and started again on the same state: nothing is sent twice, and what
    // happens next is sent.
    let dir = match backend {
        Backend::Distributed => {
            server
                .restart_every_process(Process::kill, Duration::ZERO)
                .await;
            None
        }
        _ => {
            let config = server.config.clone();
            let dir = server.stop().await;
            server = TestServer::start_in(config).await;
            dir
        }
    };
    let operator = bearer(&server.base, &secrets.operator);
    let ada = {
        let anyone = Api::from(&server);
        let (_, tokens) = anyone
            .post(
                "/v1/auth/login",
                json!({ "email": ada_email, "password": PASSWORD }),
            )
            .await;
        bearer(
            &server.base,
            tokens["access_token"].as_str().expect("token"),
        )
    };
    let again = order(&ada, "TEA-1", "tok_ok").await;
    ada.order_settles(&again, "confirmed").await;
    assert_eq!(kinds(&operator, &path, 5).await.len(), 5);
    let lines = written(&server);
    let mut ids: Vec<&str> = lines
        .iter()
        .map(|l| l["notification_id"].as_str().expect("id"))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!((lines.len(), ids.len()), (5, 5), "{lines:?}");
    server.finish().await;
    drop(dir);
}

/// A local SMTP server: it takes every mail and keeps its text.
async fn smtp_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("smtp://{}", listener.local_addr().expect("address"));
    let mails = Arc::new(Mutex::new(vec![]));
    let kept = mails.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let kept = kept.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 localhost ready\r\n").await;
                let mut data: Option<String> = None;
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(mail) = data.as_mut() {
                        if line == "." {
                            kept.lock().expect("mails").push(std::mem::take(mail));
                            data = None;
                            let _ = write.write_all(b"250 queued\r\n").await;
                        } else {
                            mail.push_str(&line);
                            mail.push('\n');
                        }
                        continue;
                    }
                    let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
                    let answer: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250-localhost\r\n250 8BITMIME\r\n",
                        "DATA" => {
                            data = Some(String::new());
                            b"354 go on\r\n"
                        }
                        "QUIT" => {
                            let _ = write.write_all(b"221 bye\r\n").await;
                            break;
                        }
                        _ => b"250 ok\r\n",
                    };
                    let _ = write.write_all(answer).await;
                }
            });
        }
    });
    (url, mails)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_smtp_a_customer_gets_one_mail_per_event_with_its_id() {
    let (url, mails) = smtp_server().await;
    let notifier = infra::config::Notifier::Smtp {
        url,
        from: "Orderline <orderline@localhost>".into(),
    };
    let (server, secrets) = TestServer::secured_with(Backend::Sqlite, None, notifier).await;
    let operator = bearer(&server.base, &secrets.operator);
    stock(&operator, "TEA-1").await;
    let (ada_id, ada_email, ada) = sign_up(&server, "ada").await;
    let placed = order(&ada, "TEA-1", "tok_ok").await;
    ada.order_settles(&placed, "confirmed").await;
    let page = ada
        .eventually("/v1/notifications", "one sent", |page| {
            page["items"].as_array().map(Vec::len) == Some(1)
        })
        .await;
    let sent = &page["items"][0];
    assert_eq!(sent["channel"], "smtp");
    assert_eq!(sent["kind"], "order_confirmed");
    let id = sent["notification_id"].as_str().expect("id");
    let mails = mails.lock().expect("mails").clone();
    assert_eq!(mails.len(), 1, "{mails:?}");
    let mail = &mails[0];
    assert!(mail.contains(&format!("<{id}@orderline>")), "{mail}");
    assert!(mail.contains(&ada_email), "{mail}");
    assert!(
        mail.contains(&format!("Your order {placed} is confirmed")),
        "{mail}"
    );
    let _ = ada_id;
    server.finish().await;
}
