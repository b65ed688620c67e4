//! The Python package of `python/` installed as a user installs it, for the tests that run
//! Python apps against a real hub.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{Context as _, Result, ensure};

fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or_else(|| Path::new(".."))
}

fn run(command: &mut Command) -> Result<Output> {
    let shown = format!("{command:?}");
    command
        .stdin(std::process::Stdio::null())
        .output()
        .with_context(|| format!("cannot run {shown}"))
}

/// The interpreter of `target/sdk-venv` with the package installed from `python/` as a
/// user does (`pip install ./python`, which builds the module with maturin). The venv is
/// made once; the package is installed again at every run (cargo rebuilds only what
/// changed).
pub fn sdk_python() -> Result<PathBuf> {
    let root = workspace_root();
    let venv = root.join("target/sdk-venv");
    let python = venv.join("bin/python");
    if !python.is_file() {
        create_venv(&venv)?;
    }
    let installed = run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "-q",
        ])
        .arg(root.join("python"))
        // The module's build runs cargo; keep it on this workspace's target dir.
        .env(
            "CARGO_TARGET_DIR",
            std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| root.join("target").into()),
        ))?;
    ensure!(
        installed.status.success(),
        "`pip install ./python` failed (it needs PyPI for maturin, and a Rust toolchain):\n{}{}",
        String::from_utf8_lossy(&installed.stdout),
        String::from_utf8_lossy(&installed.stderr)
    );
    Ok(python)
}

/// Creates a venv at `venv` with `$PYTHON` (default `python3`) and returns its
/// interpreter; fails saying what to install when Python or its venv module is missing.
pub fn create_venv(venv: &Path) -> Result<PathBuf> {
    let system = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let created = run(Command::new(&system).arg("-m").arg("venv").arg(venv))?;
    ensure!(
        created.status.success(),
        "cannot create a Python venv with `{system} -m venv`; install the venv module (for \
         example `apt-get install python3-venv`):\n{}",
        String::from_utf8_lossy(&created.stderr)
    );
    Ok(venv.join("bin/python"))
}
