//! Child processes for end-to-end tests: a guard that never leaks a process, and locating
//! (and building) the workspace's binaries.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use rustix::process::{Pid, Signal, kill_process};
use tempfile::TempDir;

/// A spawned child process that is killed (SIGKILL) and reaped when the guard drops, also
/// when a test panics. Its stdout and stderr go to a log file (see [`ChildGuard::output`]).
///
/// A guard cannot help when the test process itself is SIGKILLed: then the child outlives it.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    program: String,
    log_path: PathBuf,
    exited: Option<ExitStatus>,
    // Holds the log file's directory when the guard created it.
    _log_dir: Option<TempDir>,
}

impl ChildGuard {
    /// Spawns `command` with stdin closed and stdout + stderr captured in a temp file that
    /// lives as long as the guard.
    pub fn spawn(command: &mut Command) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("tessera-child-")
            .tempdir()
            .context("creating a temp dir for the child's output")?;
        let log_path = dir.path().join("output.log");
        let mut guard = Self::spawn_logged(command, &log_path)?;
        guard._log_dir = Some(dir);
        Ok(guard)
    }

    /// Spawns `command` with stdin closed and stdout + stderr appended to `log_path`.
    pub fn spawn_logged(command: &mut Command, log_path: &Path) -> Result<Self> {
        let program = command.get_program().to_string_lossy().into_owned();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {program}"))?;
        Ok(Self {
            child,
            program,
            log_path: log_path.to_owned(),
            exited: None,
            _log_dir: None,
        })
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// The file holding the child's stdout and stderr.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the child wrote to stdout and stderr so far (lossy UTF-8).
    pub fn output(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// Waits (polling every 10 ms) until the child's output contains `needle`, for at most
    /// `timeout`. Fails early, with the output, when the child exits first.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.try_wait()? {
                // It may have printed the needle just before exiting.
                if self.output().contains(needle) {
                    return Ok(());
                }
                bail!(
                    "{} exited ({status}) before printing {needle:?}; output:\n{}",
                    self.program,
                    tail(&self.output(), 40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not print {needle:?} within {timeout:?}; output:\n{}",
                    self.program,
                    tail(&self.output(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the child has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait()?;
        }
        Ok(self.exited)
    }

    /// Waits for the child to exit, for at most `timeout`; `None` when it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends a signal (for example [`Signal::TERM`] to test a graceful shutdown, or
    /// [`Signal::STOP`] / [`Signal::CONT`] to freeze and thaw it). No-op once it has exited.
    pub fn signal(&mut self, signal: Signal) -> Result<()> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        kill_process(Pid::from_child(&self.child), signal)
            .with_context(|| format!("sending {signal:?} to {}", self.program))
    }

    /// Asks the child to shut down (SIGTERM) and waits up to `timeout` for it to exit.
    /// Returns its exit status, or an error (after killing it) when it did not exit in time.
    pub fn terminate(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.signal(Signal::TERM)?;
        match self.wait_timeout(timeout)? {
            Some(status) => Ok(status),
            None => {
                self.kill_9()?;
                bail!(
                    "{} did not exit within {timeout:?} of SIGTERM; output:\n{}",
                    self.program,
                    tail(&self.output(), 40)
                )
            }
        }
    }

    /// Kills the child with SIGKILL (a crash, no chance to clean up) and reaps it.
    pub fn kill_9(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // `Child::kill` sends SIGKILL on Unix.
        self.child
            .kill()
            .with_context(|| format!("killing {}", self.program))?;
        let status = self.child.wait()?;
        self.exited = Some(status);
        Ok(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The path of a binary of the workspace whose package has the same name (for example
/// `cargo_bin("tessera-hub")`), built if needed. See [`cargo_bin_of`].
pub fn cargo_bin(name: &str) -> Result<PathBuf> {
    cargo_bin_of(name, name)
}

/// The path of binary `name` of workspace package `package`, built once per test process.
///
/// `env!("CARGO_BIN_EXE_<name>")` only exists for binaries of the test's own package, so the
/// binary is located from the running test executable instead:
/// `<target>/<profile>/deps/<test>-<hash>` → `<target>/<profile>/<name>` (with a
/// `<target>/<triple>/<profile>` layout when tests were built with `--target`).
///
/// The first call per binary in a test process runs
/// `cargo build -p <package> --bin <name>` with the same target dir and profile, whether or not
/// the file exists, so a test never runs a stale binary (cargo returns at once when it is up
/// to date; running cargo from a test is fine, `cargo test` holds no lock while tests run).
/// Later calls reuse the result; concurrent callers wait for the one build. The cargo used is
/// `$CARGO` (set by `cargo test`) or `cargo` from `PATH`; its output goes to the terminal.
///
/// In a fresh target dir that first build compiles the binary and its dependencies (minutes
/// for `tessera-hub`, which bundles SQLite): CI should run `cargo build --workspace --bins`
/// before the tests so no test spends its time compiling.
pub fn cargo_bin_of(package: &str, name: &str) -> Result<PathBuf> {
    built_once(package, name, || {
        build(package, name, &["--bin", name], None)
    })
}

/// The path of example `name` of workspace package `package` built with `features` (comma
/// separated, may be empty), built once per test process as [`cargo_bin_of`] builds a
/// binary: the examples a README shows run in CI this way.
pub fn cargo_example(package: &str, name: &str, features: &str) -> Result<PathBuf> {
    built_once(package, &format!("example {name}"), || {
        let mut selector = vec!["--example", name];
        if !features.is_empty() {
            selector.extend(["--features", features]);
        }
        build(package, name, &selector, Some("examples"))
    })
}

/// What `build` gave for `(package, what)` in this test process, built on first use;
/// concurrent callers wait for the one build.
fn built_once(
    package: &str,
    what: &str,
    build: impl FnOnce() -> Result<PathBuf>,
) -> Result<PathBuf> {
    type Built = HashMap<(String, String), Result<PathBuf, String>>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let mut built = BUILT
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let result = built
        .entry((package.to_owned(), what.to_owned()))
        .or_insert_with(|| build().map_err(|e| format!("{e:#}")));
    result.clone().map_err(anyhow::Error::msg)
}

/// Where cargo put the running test executable.
#[derive(Debug)]
struct TargetLayout {
    target_dir: PathBuf,
    profile_dir: PathBuf,
    triple: Option<String>,
}

fn target_layout() -> Result<TargetLayout> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let deps = exe.parent().context("test executable has no parent dir")?;
    if deps.file_name().is_none_or(|n| n != "deps") {
        bail!(
            "{} is not in a cargo `deps` dir; cannot locate workspace binaries",
            exe.display()
        );
    }
    let profile_dir = deps.parent().context("deps dir has no parent")?.to_owned();
    let above = profile_dir.parent().context("profile dir has no parent")?;
    // Cargo marks the root of every target dir with CACHEDIR.TAG.
    let (target_dir, triple) = match above.parent() {
        Some(root)
            if !above.join("CACHEDIR.TAG").exists() && root.join("CACHEDIR.TAG").exists() =>
        {
            let triple = above.file_name().map(|n| n.to_string_lossy().into_owned());
            (root.to_owned(), triple)
        }
        _ => (above.to_owned(), None),
    };
    Ok(TargetLayout {
        target_dir,
        profile_dir,
        triple,
    })
}

/// Runs `cargo build -p <package> <selector…>` for the running test's target dir and
/// profile; returns where the artefact `name` is (in the profile dir, or its `subdir`).
fn build(package: &str, name: &str, selector: &[&str], subdir: Option<&str>) -> Result<PathBuf> {
    let layout = target_layout()?;
    let profile = layout
        .profile_dir
        .file_name()
        .context("profile dir has no name")?
        .to_string_lossy()
        .into_owned();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("tests crate has no parent dir")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .arg("build")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .args(["-p", package])
        .args(selector)
        .env("CARGO_TARGET_DIR", &layout.target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    if let Some(triple) = &layout.triple {
        command.args(["--target", triple]);
    }
    // Cargo's progress and errors go straight to the terminal (libtest does not capture a
    // child's output): a cold build takes minutes and should not look like a hang.
    let status = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!(
            "`cargo build -p {package} {}` failed ({status}); cargo's errors are printed \
             above",
            selector.join(" ")
        );
    }
    let dir = match subdir {
        Some(sub) => layout.profile_dir.join(sub),
        None => layout.profile_dir.clone(),
    };
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!("cargo built {name} but {} does not exist", path.display());
    }
    Ok(path)
}

/// A file's contents as lossy UTF-8; empty when it cannot be read.
pub(crate) fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
