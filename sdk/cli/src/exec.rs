//! `somna sandbox exec`: runs a command in a sandbox, streaming its output
//! as it is produced and exiting with its exit code.

use std::io::Write;
use std::os::fd::AsFd;
use std::time::Duration;

use clap::Args;
use somna_sdk::{Client, Command, ExecEvent};
use tokio::io::AsyncReadExt;

use crate::sandbox::parse_env;

#[derive(Args)]
pub struct ExecArgs {
    /// The sandbox id.
    id: String,
    /// Environment variable (K=V); repeatable.
    #[arg(long = "env", short = 'e', value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    #[arg(long, short = 'w')]
    cwd: Option<String>,
    /// User to run as (name, uid, uid:gid).
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Forward this terminal's stdin to the command.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Run under a pseudo-terminal (implies -i).
    #[arg(long, short = 't')]
    tty: bool,
    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Runs the command; with `json` (and without -i/-t) prints one object
/// with its exit code and whole output instead of streaming it.
pub async fn run(client: &Client, args: ExecArgs, json: bool) -> anyhow::Result<i32> {
    let sandbox = client.sandbox(&args.id).await?;
    let mut cmd = Command::from_argv(args.command.clone());
    for (k, v) in args.env {
        cmd = cmd.env(k, v);
    }
    if let Some(cwd) = args.cwd {
        cmd = cmd.cwd(cwd);
    }
    if let Some(user) = args.user {
        cmd = cmd.user(user);
    }
    if let Some(t) = args.timeout {
        if !(t > 0.0 && t.is_finite()) {
            anyhow::bail!("--timeout must be a positive number of seconds");
        }
        cmd = cmd.timeout(Duration::from_secs_f64(t));
    }
    let interactive = args.interactive || args.tty;
    cmd = cmd.stdin(interactive);
    let raw = if args.tty {
        let (rows, cols) = terminal_size().unwrap_or((24, 80));
        cmd = cmd.pty(rows, cols);
        RawMode::enable()
    } else {
        None
    };

    if json && !interactive {
        return run_json(&sandbox, cmd).await;
    }
    let mut process = sandbox.spawn(cmd).await?;
    let (stdin_tx, mut stdin_rx) = tokio::sync::mpsc::channel::<Option<Vec<u8>>>(8);
    if interactive {
        tokio::spawn(async move {
            let mut stdin = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match stdin.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = stdin_tx.send(None).await;
                        return;
                    }
                    Ok(n) => {
                        if stdin_tx.send(Some(buf[..n].to_vec())).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
    }
    let mut winch =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change()).ok();
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    let mut interrupts = 0;
    let code = loop {
        tokio::select! {
            ev = process.next_event() => match ev? {
                Some(ExecEvent::Stdout(b)) => { stdout.write_all(&b)?; stdout.flush()?; }
                Some(ExecEvent::Stderr(b)) => { stderr.write_all(&b)?; stderr.flush()?; }
                Some(ExecEvent::Exit(exit)) => {
                    drop(raw);
                    if exit.timed_out || (exit.signal != 0 && !exit.message.is_empty()) {
                        eprintln!("somna: {}", exit.message);
                    }
                    break exit.exit_code;
                }
                None => break 1,
            },
            Some(chunk) = stdin_rx.recv(), if interactive => match chunk {
                Some(b) => process.write_stdin(b).await?,
                None => process.close_stdin().await?,
            },
            Some(()) = async { match winch.as_mut() { Some(w) => w.recv().await, None => std::future::pending().await } }, if args.tty => {
                if let Some((rows, cols)) = terminal_size() {
                    process.resize(rows, cols).await?;
                }
            },
            _ = tokio::signal::ctrl_c(), if !args.tty => {
                // First Ctrl-C interrupts the remote command; a second one
                // gives up waiting for it.
                interrupts += 1;
                if interrupts > 1 {
                    break 130;
                }
                process.signal(libc::SIGINT).await?;
            }
        }
    };
    Ok(code)
}

async fn run_json(sandbox: &somna_sdk::Sandbox, cmd: Command) -> anyhow::Result<i32> {
    let out = sandbox.spawn(cmd).await?.wait_with_output().await?;
    println!(
        "{}",
        serde_json::json!({
            "sandbox_id": sandbox.id(),
            "exit_code": out.exit_code,
            "signal": out.signal,
            "timed_out": out.timed_out,
            "message": out.message,
            "stdout": out.stdout_text(),
            "stderr": out.stderr_text(),
        })
    );
    Ok(out.exit_code)
}

fn terminal_size() -> Option<(u16, u16)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes a winsize into the struct we pass.
    let r = unsafe { libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// The local terminal in raw mode for `-t`; restored on drop.
struct RawMode {
    saved: nix::sys::termios::Termios,
}

impl RawMode {
    fn enable() -> Option<RawMode> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd()).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }
}
