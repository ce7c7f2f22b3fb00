//! Output of the CLI commands.

use std::io::Write;

/// Writes `text` to stdout. A reader that stops early (`lexflow evals RUN --json | head`) is not an error: the rest
/// is not wanted, so a closed pipe ends the output quietly instead of a panic or an error message.
pub fn print_to_stdout(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}
