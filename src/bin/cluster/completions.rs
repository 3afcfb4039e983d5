//! `cluster completions SHELL` and `cluster man`: a shell completion
//! script (clap_complete) and the man page (clap_mangen), generated from
//! the same command definition the parser uses.

use std::io::Write;
use std::process::ExitCode;

use crate::config_file::command;

/// Prints the completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command(), "cluster", &mut out);
    print(&out)
}

/// Prints the man page (section 1, roff).
pub fn man() -> ExitCode {
    let mut out = Vec::new();
    if let Err(e) = clap_mangen::Man::new(command()).render(&mut out) {
        eprintln!("cluster: error: cannot render the man page: {e}");
        return ExitCode::FAILURE;
    }
    print(&out)
}

fn print(bytes: &[u8]) -> ExitCode {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cluster: error: {e}");
            ExitCode::FAILURE
        }
    }
}
