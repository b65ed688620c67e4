//! A real `tessera-agent` in a temp dir, enrolled with a one-time code against a
//! [`TestHub`], for the tests that take the app → device path whole.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::hub::{TestHub, run_checked};
use crate::process::{ChildGuard, cargo_bin};
use crate::wait::wait_until_blocking;

/// A `tessera-agent` for a device, with its configuration and store in a temp dir.
#[derive(Debug)]
pub struct Agent {
    _dir: tempfile::TempDir,
    config: PathBuf,
}

impl Agent {
    /// Writes the configuration and enrolls with the one-time `code`.
    pub fn enroll(hub: &TestHub, device: &str, code: &str) -> Result<Self> {
        Self::enroll_with(hub, device, code, "")
    }

    /// [`Agent::enroll`] with `mqtt_extra` added to the `[mqtt]` section (`version =
    /// "3.1.1"`, say).
    pub fn enroll_with(hub: &TestHub, device: &str, code: &str, mqtt_extra: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let config = dir.path().join("agent.toml");
        // Presentations are refused for one window after the agent starts: 2 s, not 60.
        std::fs::write(
            &config,
            format!(
                "device_id = \"{device}\"\ntrust_anchor_file = {:?}\nsocket = {:?}\n\
                 presentation_window_s = 2\nrequest_timeout_ms = 3000\n\
                 [store]\ndir = {:?}\n[mqtt]\nport = {}\n{mqtt_extra}\n",
                hub.dir().trust_anchor_path(),
                dir.path().join("agent.sock"),
                dir.path().join("state"),
                hub.broker().port(),
            ),
        )?;
        let agent = Self { _dir: dir, config };
        run_checked(
            agent
                .command(&["enroll", "--timeout-s", "20"])?
                .env("TESSERA_AGENT_ENROLLMENT_CODE", code),
        )?;
        Ok(agent)
    }

    /// Runs the agent (`run`) until it checks presentations: the window since its start
    /// passed and its revocation knowledge fresh.
    pub fn run_until_checking(&self) -> Result<ChildGuard> {
        let mut run = ChildGuard::spawn(&mut self.command(&["run"])?)?;
        wait_until_blocking(
            "the agent to check presentations (window since start passed, revocations fresh)",
            Duration::from_secs(30),
            || {
                if let Some(status) = run.try_wait()? {
                    anyhow::bail!("the agent exited ({status}):\n{}", run.output());
                }
                let status = self.status()?;
                let ready = status["revocation_fresh"] == true
                    && status["presentations_accepted_from_ms"]
                        .as_u64()
                        .zip(status["now_ms"].as_u64())
                        .is_some_and(|(from, now)| now >= from);
                Ok(ready.then_some(()))
            },
        )
        .with_context(|| format!("agent {}", self.config().display()))?;
        Ok(run)
    }

    pub fn command(&self, args: &[&str]) -> Result<Command> {
        let mut command = Command::new(cargo_bin("tessera-agent")?);
        command.arg("--config").arg(&self.config).args(args);
        Ok(command)
    }

    /// `status --json` of the running agent.
    pub fn status(&self) -> Result<serde_json::Value> {
        let printed = run_checked(&mut self.command(&["status", "--json"])?)?;
        serde_json::from_str(&printed).with_context(|| format!("status --json: {printed}"))
    }

    /// `verify --scope <scope> <hex>`: its exit status and stdout.
    pub fn verify(&self, scope: &str, presentation: &[u8]) -> Result<(bool, String)> {
        let Output { status, stdout, .. } = self
            .command(&["verify", "--scope", scope, &hex::encode(presentation)])?
            .stdin(std::process::Stdio::null())
            .output()?;
        Ok((
            status.success(),
            String::from_utf8_lossy(&stdout).into_owned(),
        ))
    }

    pub fn config(&self) -> &Path {
        &self.config
    }
}
