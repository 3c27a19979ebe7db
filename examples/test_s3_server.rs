//! The test suite's S3 server (s3s-fs on a loopback port, SigV4) as a process, for the Python
//! package's tests: prints one JSON line with its settings (`endpoint`, `bucket`, `prefix`,
//! `region`, `access_key`, `secret_key`) and serves until its standard input closes.
//!
//! ```text
//! cargo run --example test_s3_server
//! ```

#[allow(unused_imports)]
#[path = "../tests/support/s3.rs"]
mod s3;

use tokio::io::AsyncReadExt;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = s3::TestS3::start().await?;
    let config = server.config();
    let settings = serde_json::json!({
        "endpoint": config.endpoint,
        "bucket": config.bucket,
        "prefix": config.prefix,
        "region": config.region,
        "access_key": config.access_key,
        "secret_key": config.secret_key,
    });
    println!("{settings}");
    // Serve until whoever started this closes our standard input (or kills us).
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    drop(server);
    Ok(())
}
