//! The Somna guest agent: the one program inside every sandbox microVM.
//!
//! It owns the guest side of "the guest contract" (see `ARCHITECTURE.md`):
//!
//! - as PID 1 of the initramfs it mounts `/dev`, `/proc` and `/sys`, loads the
//!   kernel modules, finds the `somna-root` and `somna-rw` disks by serial,
//!   mounts their overlay and switches root into it ([`init`]);
//! - it reaps every process of the VM ([`reaper`]);
//! - it serves `somna.guest.v1.GuestAgent` (process execution, the files API,
//!   health, shutdown, and the wake after a snapshot restore: [`wake`]) over
//!   the host channel: a virtio-serial port or vsock ([`channel`]);
//! - it gives every sandbox its identity: sandbox id, hostname and a unique
//!   `/etc/machine-id` ([`identity`]).
//!
//! For tests it also runs on a host as an ordinary process ("dev mode":
//! `somna-guest-agent serve --root DIR --listen SOCK`), serving the same
//! service on a Unix socket with DIR as the sandbox root ([`dev`]).

mod channel;
mod cmdline;
mod dev;
mod exec;
mod fdio;
mod files;
mod h2server;
mod h2sync;
mod identity;
mod init;
mod logging;
mod modules;
mod mounts;
mod net;
mod reaper;
mod serial;
mod service;
mod user;
mod wake;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "somna-guest-agent", version, about = "Somna in-VM guest agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dev mode: serve the guest protocol on a Unix socket with DIR as the
    /// sandbox root (PID 1 mode starts by itself when the agent is PID 1).
    Serve(dev::ServeArgs),
}

fn main() -> ExitCode {
    // As PID 1 the kernel passes unknown command-line words as arguments, so
    // the mode is decided by the pid, before any argument parsing.
    if nix::unistd::getpid().as_raw() == 1 {
        init::run_as_pid1();
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => match dev::serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("somna-guest: error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
