//! `device import`: a fleet registered from a CSV file, all or nothing, in one transaction.
//!
//! Every row is checked before anything is written, and every bad row is reported (up to
//! [`MAX_SHOWN`] of them, then how many more), so a file of 100,000 devices is fixed in one
//! pass rather than one error per attempt. Ids already registered and keys of revoked
//! devices are looked up with one query each, not one per row. One-time enrollment codes go
//! to a new private file (`--codes`), never to the terminal or a log.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use tessera_hub::clock::{Clock, SystemClock};
use tessera_hub::config::HubConfig;
use tessera_hub::keyfile;
use tessera_hub::policy::Policy;
use tessera_hub::store::{ClientKind, ClientRecord, Store};
use tessera_shared::message::{EnrollmentCode, validate_id};

use super::open_store;
use super::registry::{check_id_is_free, check_role, new_enrollment_code};
use super::text::counted;

/// The first line of an import file.
const HEADER: &str = "id,role,group,key";

/// The first line of a codes file.
const CODES_HEADER: &str = "id,code";

/// Most bad rows printed; the rest are counted.
const MAX_SHOWN: usize = 50;

/// A bad row: where, which id, why.
struct Problem {
    line: usize,
    id: String,
    reason: String,
}

/// A row that passed every check of its own (the store's checks come after).
struct Row {
    line: usize,
    id: String,
    role: String,
    groups: Vec<String>,
    /// The device's key, SEC1; `None` for a one-time enrollment code.
    public_key: Option<Vec<u8>>,
}

/// `device import FILE [--codes CODES]`: registers every device of `file` in one
/// transaction, or none if any row is bad.
pub(super) async fn import_devices(
    config: &HubConfig,
    file: &Path,
    codes: Option<&Path>,
) -> Result<()> {
    // Refused before any work: the codes file is never overwritten.
    if let Some(codes) = codes
        && codes.symlink_metadata().is_ok()
    {
        bail!(
            "{} already exists: the codes file is never overwritten (it holds one-time \
             enrollment codes); give a new file to --codes",
            codes.display()
        );
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let policy = Policy::load(&config.policy)?;
    let store = open_store(config)?;
    let base = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };

    let (rows, mut problems, total) = parse(config, &policy, &text, base, file)?;
    // One query each, for every row at once.
    let taken = store
        .registered_among(rows.iter().map(|r| r.id.clone()).collect())
        .await?;
    let retired = store
        .retired_among(rows.iter().filter_map(|r| r.public_key.clone()).collect())
        .await?;
    for row in &rows {
        if taken.contains(&row.id) {
            problems.push(Problem {
                line: row.line,
                id: row.id.clone(),
                reason: "already registered".into(),
            });
        }
        if let Some(device) = row.public_key.as_ref().and_then(|k| retired.get(k)) {
            problems.push(Problem {
                line: row.line,
                id: row.id.clone(),
                reason: format!(
                    "its key belonged to device `{device}`, which was revoked: a revoked \
                     device's key is never accepted again"
                ),
            });
        }
    }
    if !problems.is_empty() {
        bail!("{}", report(file, problems, total));
    }
    if rows.is_empty() {
        bail!("{}: no device to register", file.display());
    }
    let coded = rows.iter().filter(|r| r.public_key.is_none()).count();
    let codes = match codes {
        None if coded > 0 => bail!(
            "{}: {} without a key: give --codes FILE for their one-time enrollment codes \
             (never printed); nothing was registered",
            file.display(),
            counted(coded, "row", "rows")
        ),
        codes => codes,
    };

    let now = SystemClock.now();
    let mut issued = Vec::with_capacity(coded);
    let mut records = Vec::with_capacity(rows.len());
    for row in rows {
        let code_key = match row.public_key {
            Some(_) => None,
            None => {
                let code = new_enrollment_code()?;
                let key = EnrollmentCode::derive_key(&code);
                issued.push((row.id.clone(), code));
                Some(key)
            }
        };
        records.push(ClientRecord {
            id: row.id,
            kind: ClientKind::Device,
            public_key: row.public_key,
            role: row.role,
            groups: row.groups,
            enrollment_code_key: code_key,
            enrolled_at: None,
            revoked_at: None,
            created_at: now,
        });
    }
    let count = records.len();
    // Written (and synced) before the devices are registered: a code the operator never
    // received would leave a device that can never enroll.
    let written = match codes {
        Some(path) => Some(CodesFile::write(path, &issued)?),
        None => None,
    };
    drop(issued);
    if let Err(e) = store.add_clients(records).await {
        if let Some(written) = written {
            written.discard();
        }
        return Err(e).context("nothing was registered");
    }
    let how = match codes {
        Some(path) => format!(
            "{} with their keys, {} with one-time enrollment codes written to {}",
            count - coded,
            coded,
            path.display()
        ),
        None => "all with their keys".to_owned(),
    };
    println!(
        "registered {} from {}: {how}",
        counted(count, "device", "devices"),
        file.display()
    );
    Ok(())
}

/// Checks every row on its own: returns the good rows, the bad ones, and how many rows
/// there were. Fails only when the file has no header.
fn parse(
    config: &HubConfig,
    policy: &Policy,
    text: &str,
    base: &Path,
    file: &Path,
) -> Result<(Vec<Row>, Vec<Problem>, usize)> {
    let mut lines = text.lines().enumerate();
    let header = lines
        .next()
        .map(|(_, l)| l.trim_start_matches('\u{feff}').trim());
    if header != Some(HEADER) {
        bail!(
            "{}: the first line must be the header `{HEADER}` (found {:?}); then one device \
             per line: group may hold several groups separated by `;` or be empty, key is \
             the path of the device's public key (SPKI PEM, relative to the CSV file) or \
             empty for a one-time enrollment code",
            file.display(),
            header.unwrap_or("an empty file")
        );
    }
    let mut rows = Vec::new();
    let mut problems = Vec::new();
    let mut first_line_of: HashMap<String, usize> = HashMap::new();
    // A role is checked once, however many rows name it.
    let mut roles: HashMap<String, Option<String>> = HashMap::new();
    let mut total = 0;
    for (n, line) in lines {
        let line_no = n + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        total += 1;
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let mut reasons = Vec::new();
        let [id, role, groups, key] = fields[..] else {
            problems.push(Problem {
                line: line_no,
                id: fields[0].to_owned(),
                reason: format!(
                    "expected 4 fields ({HEADER}), found {} (no quoting: no field holds a \
                     comma)",
                    fields.len()
                ),
            });
            continue;
        };
        if validate_id(id).is_err() {
            reasons.push("invalid id (A-Z a-z 0-9 . _ -, 1 to 64 characters)".to_owned());
        } else if let Err(e) = check_id_is_free(config, policy, id) {
            reasons.push(format!("reserved id: {e}"));
        }
        match first_line_of.get(id) {
            Some(first) => reasons.push(format!("duplicate id: also on line {first}")),
            None => {
                first_line_of.insert(id.to_owned(), line_no);
            }
        }
        let role_problem = roles
            .entry(role.to_owned())
            .or_insert_with(|| {
                check_role(policy, role, ClientKind::Device)
                    .err()
                    .map(|e| e.to_string())
            })
            .clone();
        reasons.extend(role_problem);
        let groups: Vec<String> = groups
            .split(';')
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .map(str::to_owned)
            .collect();
        for g in &groups {
            if policy.group(g).is_none() {
                reasons.push(format!(
                    "unknown group `{g}` (not in the policy's [groups])"
                ));
            }
        }
        let public_key = if key.is_empty() {
            None
        } else {
            match keyfile::read_public(&base.join(key)) {
                Ok(k) => Some(k.to_sec1().to_vec()),
                Err(e) => {
                    reasons.push(format!("unreadable key: {e}"));
                    None
                }
            }
        };
        if reasons.is_empty() {
            rows.push(Row {
                line: line_no,
                id: id.to_owned(),
                role: role.to_owned(),
                groups,
                public_key,
            });
        } else {
            problems.push(Problem {
                line: line_no,
                id: id.to_owned(),
                reason: reasons.join("; "),
            });
        }
    }
    Ok((rows, problems, total))
}

/// The report of bad rows, in file order, at most [`MAX_SHOWN`] of them.
fn report(file: &Path, problems: Vec<Problem>, total: usize) -> String {
    // A row with a problem of its own and one found in the store is one bad row.
    let mut rows: Vec<Problem> = Vec::with_capacity(problems.len());
    let mut problems = problems;
    problems.sort_by_key(|p| p.line);
    for p in problems {
        match rows.last_mut() {
            Some(last) if last.line == p.line => {
                last.reason.push_str("; ");
                last.reason.push_str(&p.reason);
            }
            _ => rows.push(p),
        }
    }
    let mut out = format!(
        "{}: {} of {} {} bad; nothing was registered:",
        file.display(),
        rows.len(),
        counted(total, "row", "rows"),
        if rows.len() == 1 { "is" } else { "are" }
    );
    for p in rows.iter().take(MAX_SHOWN) {
        out.push_str(&format!("\n  line {} ({}): {}", p.line, p.id, p.reason));
    }
    if rows.len() > MAX_SHOWN {
        out.push_str(&format!(
            "\n  … and {}",
            counted(rows.len() - MAX_SHOWN, "more bad row", "more bad rows")
        ));
    }
    out
}

/// A codes file written before the devices are registered.
struct CodesFile {
    path: PathBuf,
}

impl CodesFile {
    /// Creates `path` (mode 0600, never overwriting) with an `id,code` line per code, synced.
    fn write(path: &Path, codes: &[(String, String)]) -> Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| {
                format!(
                    "cannot create the codes file {} (it is never overwritten); nothing was \
                     registered",
                    path.display()
                )
            })?;
        let written = Self {
            path: path.to_path_buf(),
        };
        let mut out = std::io::BufWriter::new(file);
        let result = writeln!(out, "{CODES_HEADER}")
            .and_then(|()| {
                codes
                    .iter()
                    .try_for_each(|(id, code)| writeln!(out, "{id},{code}"))
            })
            .and_then(|()| out.into_inner().map_err(|e| e.into_error()))
            .and_then(|f| f.sync_all());
        match result {
            Ok(()) => Ok(written),
            Err(e) => {
                written.discard();
                Err(e).with_context(|| {
                    format!("cannot write {}; nothing was registered", path.display())
                })
            }
        }
    }

    /// Removes the file: its codes were never registered.
    fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
