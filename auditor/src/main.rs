//! `auditor`: the CLI over the auditor library: audit a record directory, verify a report,
//! adjudicate an evidence bundle, or run the daemon (`serve`). Parsing and printing only; the
//! work is in the library, and each command is a module of [`cli`].
//!
//! Exit codes ([`cli::exit::EXIT_CODES`], also in `--help` and the README): 0 consistent, 1 an
//! adverse verdict, 2 could not decide, 3 (`adjudicate`) neither side's leaf reproduced, 64 a
//! usage or configuration error. A parse error from clap is a usage error too (clap's own exit
//! code, 2, would read as "could not decide").
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use cli::exit::{EXIT_CODES, Exit};

/// See the workspace manifest: glibc's malloc returns large op buffers to the OS after every op;
/// `main` tells mimalloc to keep freed pages too, except for `serve` ([`kernels::keep_freed_pages`]).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "auditor",
    version,
    about = "Audit a tiebreak training record on another device profile",
    after_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
#[allow(clippy::large_enum_variant, reason = "one value, parsed once and moved into its command")]
enum Command {
    /// Replay a record (or a segment of it) and report the verdict.
    #[command(after_help = EXIT_CODES)]
    Audit(cli::audit::AuditArgs),
    /// Check a report's signature and inclusion proofs (and, with --auditor-key, its signer).
    #[command(after_help = EXIT_CODES)]
    VerifyReport(cli::verify::VerifyArgs),
    /// Run the auditor daemon: audits over HTTP against trainers' record servers, signed
    /// reports at /v1/reports/{id}, metrics at /metrics. Stops gracefully on SIGTERM or Ctrl-C.
    #[command(after_help = EXIT_CODES)]
    Serve(cli::serve::ServeArgs),
    /// Re-execute the disputed step of an evidence bundle and say whose side it takes.
    #[command(after_help = cli::adjudicate::EXIT_CODES)]
    Adjudicate(cli::adjudicate::AdjudicateArgs),
    /// Submit an audit to a daemon (`--wait`: then wait for its verdict).
    #[command(after_help = EXIT_CODES)]
    Submit(cli::client::SubmitArgs),
    /// One audit's state, verdict and live progress (steps, rate, ETA) on a daemon.
    Status(cli::client::IdArgs),
    /// Wait for an audit on a daemon to finish, with a progress bar; exits with its verdict's code.
    #[command(after_help = EXIT_CODES)]
    Wait(cli::client::WaitArgs),
    /// A daemon's audits, newest first.
    List(cli::client::ListArgs),
    /// Fetch an audit's signed report from a daemon, verify it and print the verdict; optionally
    /// save it and its evidence bundle.
    #[command(after_help = EXIT_CODES)]
    Report(cli::client::ReportArgs),
    /// Cancel a queued or running audit on a daemon.
    Cancel(cli::client::IdArgs),
    /// Make a new signing key (a fleet's `key_file`) and print its public key.
    Keygen(cli::keys::KeygenArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // `--help` and `--version` print to stdout and succeed; every other parse error is a
            // usage error. A closed pipe while printing is not worth a word (see cli::output).
            let _ = e.print();
            return if e.use_stderr() { Exit::Usage } else { Exit::Ok }.into();
        }
    };
    // The daemon keeps mimalloc's default, so what an audit used goes back to the OS when idle.
    if !matches!(cli.command, Command::Serve(_)) {
        kernels::keep_freed_pages();
    }
    let result = match cli.command {
        Command::Audit(args) => cli::audit::run(args),
        Command::VerifyReport(args) => cli::verify::run(args),
        Command::Serve(args) => cli::serve::run(args),
        Command::Adjudicate(args) => cli::adjudicate::run(args),
        Command::Submit(args) => cli::client::submit(args),
        Command::Status(args) => cli::client::status(args),
        Command::Wait(args) => cli::client::wait(args),
        Command::List(args) => cli::client::list(args),
        Command::Report(args) => cli::client::report(args),
        Command::Cancel(args) => cli::client::cancel(args),
        Command::Keygen(args) => cli::keys::keygen(args),
    };
    match result {
        Ok(exit) => exit.into(),
        Err(failure) => {
            failure.report();
            failure.exit().into()
        }
    }
}
