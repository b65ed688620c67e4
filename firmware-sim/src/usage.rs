//! What the run reads of the machine's processes: CPU time (`/proc/<pid>/stat`) and peak
//! resident memory (`/proc/<pid>/status`) of the hub, the broker and the simulator itself,
//! and the open-file limit a fleet of connections needs.
//!
//! A process is known by its pid; a restarted hub or broker is a new pid, and its figures
//! add to (CPU) or compete with (peak RSS) the old one's.

use std::collections::BTreeMap;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::Error;

/// File descriptors the simulator needs besides one per device (its own broker client,
/// the watcher, the attacker, logs, the runtime).
pub const SPARE_FDS: u64 = 256;

/// The open-file limit after [`raise_open_files`]: the soft limit it set, the hard limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit now in force (`None`: unlimited).
    pub soft: Option<u64>,
    /// The hard limit (`None`: unlimited).
    pub hard: Option<u64>,
}

/// Raises the process's soft `RLIMIT_NOFILE` to its hard limit: every device is a
/// connection, and the broker and hub the run starts inherit the limit (Mosquitto needs a
/// descriptor per client too). Fails, saying what to do, when even the hard limit is too
/// low for `devices` connections.
pub fn raise_open_files(devices: usize) -> Result<OpenFiles, Error> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let mut soft = current;
    if current != maximum {
        // Lowering never happens: the hard limit is at least the soft one.
        if setrlimit(
            Resource::Nofile,
            Rlimit {
                current: maximum,
                maximum,
            },
        )
        .is_ok()
        {
            soft = maximum;
        }
    }
    let need = u64::try_from(devices)
        .unwrap_or(u64::MAX)
        .saturating_add(SPARE_FDS);
    if let Some(limit) = soft
        && limit < need
    {
        return Err(Error::Process(format!(
            "{devices} devices need about {need} open files (one connection each, in the \
             simulator and in the broker), but the limit is {limit} (hard limit {}): raise \
             it (`ulimit -Hn`, /etc/security/limits.conf, LimitNOFILE= for a service) or run \
             fewer devices",
            maximum.map_or_else(|| "unlimited".into(), |m| m.to_string())
        )));
    }
    Ok(OpenFiles {
        soft,
        hard: maximum,
    })
}

/// Clock ticks per second, the unit of `/proc/<pid>/stat`'s times.
fn ticks_per_second() -> u64 {
    match rustix::param::clock_ticks_per_second() {
        0 => 100,
        hz => hz,
    }
}

/// User plus system CPU time of process `pid` so far, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat)
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name
/// (field 2) is in parentheses and may hold spaces and parentheses itself, so the fields
/// are counted from the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The peak resident set of process `pid` (VmHWM), kB.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Whether process `pid` exists (and is not a zombie).
pub fn is_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|state| state != "Z")
        })
        .unwrap_or(false)
}

/// One role's processes (the hub, or the broker, over restarts): CPU time used during the
/// run and the largest peak RSS.
#[derive(Debug, Default)]
pub struct Meter {
    /// By pid: CPU ticks at the first sample (0 for a process started during the run),
    /// at the last sample, and the peak RSS seen, kB.
    processes: BTreeMap<u32, (u64, u64, u64)>,
    /// Whether any process was ever sampled.
    seen: bool,
}

impl Meter {
    /// Notes a process that runs as the run starts: its CPU time from now on is the run's.
    pub fn start(&mut self, pid: Option<u32>) {
        if let Some(pid) = pid
            && let Some(ticks) = cpu_ticks(pid)
        {
            self.processes.insert(pid, (ticks, ticks, 0));
            self.seen = true;
            self.sample(Some(pid));
        }
    }

    /// Samples `pid`; one not seen before started during the run, so all of its CPU time
    /// counts. A process that is gone keeps its last sample.
    pub fn sample(&mut self, pid: Option<u32>) {
        let Some(pid) = pid else { return };
        let Some(ticks) = cpu_ticks(pid) else { return };
        self.seen = true;
        let entry = self.processes.entry(pid).or_insert((0, 0, 0));
        entry.1 = entry.1.max(ticks);
        if let Some(kb) = peak_rss_kb(pid) {
            entry.2 = entry.2.max(kb);
        }
    }

    /// CPU seconds (user + system) used during the run, over every process; `None` if
    /// none could be read.
    pub fn cpu_s(&self) -> Option<f64> {
        let ticks: u64 = self
            .processes
            .values()
            .map(|(first, last, _)| last.saturating_sub(*first))
            .sum();
        // Ticks to seconds, rounded to 10 ms: far below f64's exact range.
        #[allow(clippy::cast_precision_loss)]
        self.seen
            .then(|| (ticks as f64 / ticks_per_second() as f64 * 100.0).round() / 100.0)
    }

    /// Average cores used over `seconds` of wall time.
    pub fn cores(&self, seconds: f64) -> Option<f64> {
        self.cpu_s()
            .filter(|_| seconds > 0.0)
            .map(|cpu| (cpu / seconds * 1000.0).round() / 1000.0)
    }

    /// The largest peak RSS seen, MB with one decimal; `None` if none could be read.
    pub fn rss_mb(&self) -> Option<f64> {
        // kB to MB with one decimal; far below f64's exact range.
        #[allow(clippy::cast_precision_loss)]
        self.processes
            .values()
            .map(|(_, _, kb)| *kb)
            .filter(|kb| *kb > 0)
            .max()
            .map(|kb| (kb as f64 / 1024.0 * 10.0).round() / 10.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name_whatever_it_holds() {
        let stat = "4242 (tessera (hub) x) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    37 5 0 0 20 0 9 0 12345 100000 2000 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(42));
        assert_eq!(parse_cpu_ticks("4242 (short) S 1"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn this_process_is_measured_and_alive() {
        let me = std::process::id();
        assert!(cpu_ticks(me).is_some());
        assert!(peak_rss_kb(me).is_some_and(|kb| kb > 0));
        assert!(is_alive(me));
        let mut meter = Meter::default();
        meter.start(Some(me));
        assert!(meter.cpu_s().is_some());
        assert!(meter.rss_mb().is_some());
        assert_eq!(Meter::default().cpu_s(), None);
    }
}
