//! A real client: the official `openai` Python SDK (from PyPI, in a virtualenv under
//! `target/`) runs a scripted session through the gateway.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use tempfile::TempDir;

use super::Running;

/// The SDK version the session is checked with.
const OPENAI: &str = "openai==3.60.0";

/// A virtualenv with the SDK, made once under the target directory (this is what the test
/// command installs; nothing outside `target/` is touched).
fn python() -> Result<PathBuf> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("py-venv-openai");
    let python = venv.join("bin/python");
    let ready = venv.join(".ready");
    if ready.is_file() {
        return Ok(python);
    }
    let run = |cmd: &mut Command| -> Result<()> {
        let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
        if !out.status.success() {
            bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let base = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    run(Command::new(&base).args(["-m", "venv"]).arg(&venv))?;
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", OPENAI]))?;
    std::fs::write(&ready, OPENAI)?;
    Ok(python)
}

#[tokio::test]
async fn the_openai_python_sdk_gets_misses_then_hits() -> Result<()> {
    let python = tokio::task::spawn_blocking(python).await??;
    let dir = TempDir::new()?;
    let gw = Running::new(dir.path()).await?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gateway/openai_session.py");
    let base = gw.url("/v1");
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .env("OPENAI_BASE_URL", base)
            .env_remove("OPENAI_API_KEY")
            .output()
    })
    .await??;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_slice(&output.stdout)?;
    let json = &seen["json"];
    assert_eq!(json[0]["cache"], "MISS", "{seen}");
    assert_eq!(json[1]["cache"], "HIT", "{seen}");
    assert_eq!(json[0]["content"], json[1]["content"]);
    assert_eq!(json[0]["key"], json[1]["key"]);
    assert_eq!(json[0]["usage"], 19);
    let stream = &seen["stream"];
    assert_eq!(
        stream[0], stream[1],
        "the streamed hit reads as the miss did: {seen}"
    );
    assert!(
        stream[0]["content"]
            .as_str()
            .unwrap_or("")
            .starts_with("answer #")
    );
    assert_eq!(stream[1]["usage"], 19, "usage replayed on the streamed hit");
    let tool = &seen["tool"];
    assert_eq!(tool[0]["cache"], "MISS");
    assert_eq!(tool[1]["cache"], "HIT");
    assert_eq!(tool[1]["name"], "weather");
    assert_eq!(tool[1]["arguments"]["city"], "Paris");
    // Three distinct requests, each sent upstream once.
    assert_eq!(gw.upstream.calls(), 3, "{seen}");
    gw.stop().await
}
