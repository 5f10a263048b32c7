//! Dev mode: the agent as an ordinary host process, for tests.
//!
//! Serves the same service on a Unix socket (many connections), with a host
//! directory as the sandbox root: the files API resolves inside it and exec'd
//! processes are chroot'ed into it (unless it is "/"). The agent becomes a
//! child subreaper, so orphans are reparented to it and reaped as by PID 1.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::sync::Notify;

use crate::channel;
use crate::exec::ExecEnv;
use crate::files::Root;
use crate::identity::SharedIdentity;
use crate::logging;
use crate::reaper::Reaper;
use crate::service::{Agent, OnShutdown};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The sandbox root directory.
    #[arg(long)]
    root: PathBuf,
    /// Path of the Unix socket to listen on (replaced if it exists).
    #[arg(long)]
    listen: PathBuf,
    /// The sandbox id the agent reports and checks requests against.
    #[arg(long, default_value = "dev")]
    sandbox_id: String,
    /// Log filter, e.g. "debug".
    #[arg(long, env = "SOMNA_LOG", default_value = "info")]
    log: String,
}

fn context(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

pub fn serve(args: ServeArgs) -> io::Result<()> {
    logging::init(&args.log);
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| context("become a child subreaper")(e.into()))?;
    crate::init::raise_fd_limit();
    let root_path = std::fs::canonicalize(&args.root)
        .map_err(context(format!("sandbox root {}", args.root.display())))?;
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(context("start the tokio runtime"))?;
    let result = runtime.block_on(async {
        let reaper = Reaper::start().map_err(context("install the SIGCHLD handler"))?;
        let root = Arc::new(Root::open(&root_path)?);
        let stop = Arc::new(Notify::new());
        let exec = ExecEnv {
            root,
            reaper,
            identity: SharedIdentity::new(args.sandbox_id.clone(), hostname),
            chroot: root_path != Path::new("/"),
        };
        // Not a VM: Wake never sets the host's clock or hostname.
        let service = Agent::new(exec, OnShutdown::Stop(stop.clone()), false).into_service();

        match std::fs::remove_file(&args.listen) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(context(format!(
                    "remove stale socket {}",
                    args.listen.display()
                ))(e));
            }
        }
        let listener = UnixListener::bind(&args.listen)
            .map_err(context(format!("listen on {}", args.listen.display())))?;
        tracing::info!(
            "serving sandbox {:?} rooted at {} on {}",
            args.sandbox_id,
            root_path.display(),
            args.listen.display()
        );
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let service = service.clone();
                        tokio::spawn(async move {
                            if let Err(e) = channel::serve_connection(stream, service).await {
                                tracing::debug!("connection ended: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                () = stop.notified() => break,
            }
        }
        // Give the Shutdown response time to reach the client.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = std::fs::remove_file(&args.listen);
        tracing::info!("shut down");
        Ok(())
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}
