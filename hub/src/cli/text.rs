//! How the command line words things for people.

use tessera_hub::store::ClientKind;

/// their source in their own message (`{path}: {source}`), and `{:#}` would then print
/// that source a second time: a cause the message before it ends with is left out.
pub(crate) fn error_message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    let mut previous = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.trim_end();
        if !previous.is_empty() && previous.ends_with(text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(text);
        previous = text.to_owned();
    }
    message
}

/// `n` and the noun, singular for one: "1 group", "3 groups".
pub(super) fn counted(n: usize, one: &str, many: &str) -> String {
    tessera_hub::text::counted(u64::try_from(n).unwrap_or(u64::MAX), one, many)
}

/// A client kind with its article: "a device", "an app", "an operator".
pub(super) fn a_kind(kind: ClientKind) -> &'static str {
    match kind {
        ClientKind::Device => "a device",
        ClientKind::App => "an app",
        ClientKind::Operator => "an operator",
    }
}
