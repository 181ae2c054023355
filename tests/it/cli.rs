//! The command line: a settings file, and refusing what it does not know.

use crate::support::Process;
use reqwest::StatusCode;

#[tokio::test]
async fn serve_reads_its_settings_from_a_config_file() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("from-config");
    let file = dir.path().join("orderline.env");
    std::fs::write(
        &file,
        format!(
            "# Orderline settings\nORDERLINE_LISTEN=127.0.0.1:0\nORDERLINE_DATA_DIR=\"{}\"\n\nORDERLINE_PAYMENT_TIMEOUT_MS=1000\n",
            data.display()
        ),
    )
    .expect("write");
    let process = Process::spawn(&[
        "serve".to_owned(),
        "--config".to_owned(),
        file.display().to_string(),
    ]);
    let (status, _) = process.api.get("/health").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        data.join("events.db").exists(),
        "the data directory came from the file"
    );
    process.kill();
}

#[test]
fn an_unknown_setting_in_the_config_file_is_refused_clearly() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("orderline.env");
    std::fs::write(
        &file,
        "ORDERLINE_LISTEN=127.0.0.1:0\nORDERLINE_COLOUR=blue\n",
    )
    .expect("write");
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_orderline"))
        .args(["serve", "--config"])
        .arg(&file)
        .output()
        .expect("runs");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("orderline.env:2: unknown setting ORDERLINE_COLOUR"),
        "{stderr}"
    );
}
