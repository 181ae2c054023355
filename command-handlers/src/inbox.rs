//! A service's command inbox in the distributed deployment. The saga's commands
//! arrive on `<prefix>.<service>.commands`, keyed by target aggregate. Each is carried
//! out with its command id as the idempotency key, so one delivered twice takes effect
//! once; the offsets of what was carried out are then stored in the service's
//! database. A command that fails for a reason other than a refusal is read again.

use crate::app::{CommandError, Handlers, Meta};
use infra::db::Db;
use infra::kafka::KafkaConsumer;
use infra::shutdown::Shutdown;
use schemas::commands::CommandMessage;
use std::time::Duration;

pub async fn run(handlers: Handlers, consumer: KafkaConsumer, db: Db, mut shutdown: Shutdown) {
    let mut failures: u32 = 0;
    while !shutdown.is_set() {
        let polled = match consumer.poll_batch(200, Duration::from_millis(200)).await {
            Ok(polled) => polled,
            Err(error) => {
                tracing::warn!(error = %error, "command inbox cannot poll; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut carried_out = 0;
        for record in &polled {
            match record.read::<CommandMessage>() {
                Ok(message) => {
                    let meta = Meta {
                        correlation_id: message.correlation_id,
                        causation_id: message.causation_id,
                        idempotency: None,
                    };
                    match handlers
                        .run_saga_command(message.command_id, &message.command, &meta)
                        .await
                    {
                        Ok(_) => {}
                        Err(CommandError::Domain(refusal)) => {
                            tracing::info!(command = ?message.command, reason = %refusal, correlation_id = %meta.correlation_id, "command refused");
                        }
                        Err(error) => {
                            tracing::warn!(command = ?message.command, error = %error, "command failed; it will be read again");
                            break;
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(error = %error, topic = %record.topic, offset = record.offset, "unreadable command dropped");
                }
            }
            carried_out += 1;
        }
        let stored = async {
            let mut conn = db.pool.acquire().await?;
            consumer
                .offsets
                .save_batch(&mut conn, &polled[..carried_out])
                .await
        }
        .await;
        if let Err(error) = &stored {
            tracing::error!(error = %error, "cannot store command offsets; they will be read again");
        }
        if carried_out < polled.len() || stored.is_err() {
            failures += 1;
            if let Err(error) = consumer.rewind().await {
                tracing::error!(error = %error, "cannot rewind the command inbox");
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(50)))) => {}
                _ = shutdown.wait() => {}
            }
        } else {
            failures = 0;
        }
    }
    consumer.close();
}
