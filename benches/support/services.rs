//! The outside services some scenarios need, started the way the test suite starts
//! them: PostgreSQL on 127.0.0.1:5432 (installed on first use) and a Kafka-protocol
//! broker of the benchmarks' own on 127.0.0.1:19094 (Tansu, built once into the
//! cache), on empty state for each run.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(script: &str, envs: &[(&str, String)], args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(root().join(script))
        .args(args)
        .envs(envs.iter().map(|(k, v)| (k, v.as_str())))
        .status()?;
    anyhow::ensure!(status.success(), "{script} {args:?} failed: {status}");
    Ok(())
}

/// The PostgreSQL server (`ORDERLINE_BENCH_POSTGRES`, or the local one, started
/// when down).
pub fn postgres() -> anyhow::Result<String> {
    if let Ok(url) = std::env::var("ORDERLINE_BENCH_POSTGRES") {
        return Ok(url);
    }
    run("infra/dev/postgres.sh", &[], &[])?;
    Ok("postgres://postgres@127.0.0.1:5432".into())
}

/// A broker on empty state (`ORDERLINE_BENCH_KAFKA` to use another); stopped when
/// the returned guard is dropped.
pub struct Broker {
    pub address: String,
    envs: Option<Vec<(&'static str, String)>>,
}

impl Broker {
    pub fn start() -> anyhow::Result<Broker> {
        if let Ok(address) = std::env::var("ORDERLINE_BENCH_KAFKA") {
            return Ok(Broker {
                address,
                envs: None,
            });
        }
        let address = "127.0.0.1:19094".to_owned();
        let dir = root().join("target/bench-broker");
        let envs = vec![
            ("ORDERLINE_BROKER", address.clone()),
            ("ORDERLINE_BROKER_DIR", dir.display().to_string()),
        ];
        run("infra/kafka/broker.sh", &envs, &["stop"])?;
        let _ = std::fs::remove_dir_all(&dir);
        run("infra/kafka/broker.sh", &envs, &["ensure"])?;
        Ok(Broker {
            address,
            envs: Some(envs),
        })
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(envs) = &self.envs {
            let _ = run("infra/kafka/broker.sh", envs, &["stop"]);
        }
    }
}
