//! `somna-mkimage`: writes (or updates) an OCI image layout holding one
//! layer made from a directory tree.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use somna_images::ImageConfig;
use somna_images::mkimage::{LayerInput, NewImage, write_image};

/// Make an OCI image (one gzip layer, linux/amd64) from a root file system
/// directory. Re-running with the same tag replaces it; blobs no tag uses
/// any more are removed.
#[derive(Debug, Parser)]
#[command(name = "somna-mkimage", version)]
struct Args {
    /// The root file system to archive (ownership, modes, links and xattrs
    /// are kept; run as root to read everything).
    #[arg(long, value_name = "DIR")]
    rootfs: PathBuf,
    #[arg(
        long,
        value_name = "OUT_DIR",
        help = "The OCI image layout directory to write (created if missing). The image store finds it as <local_dir>/<name>/"
    )]
    layout: PathBuf,
    #[arg(
        long,
        value_name = "NAME[:TAG]",
        help = "Name and tag, NAME[:TAG] (TAG defaults to latest)"
    )]
    tag: String,
    /// An environment variable of the image config; repeatable.
    #[arg(long = "env", value_name = "K=V", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// One argument of the entrypoint; repeat for more.
    #[arg(long = "entrypoint", value_name = "ARG", allow_hyphen_values = true)]
    entrypoint: Vec<String>,
    /// One argument of the default command; repeat for more.
    #[arg(long = "cmd", value_name = "ARG", allow_hyphen_values = true)]
    cmd: Vec<String>,
    /// Working directory of processes.
    #[arg(long, value_name = "DIR")]
    workdir: Option<String>,
    #[arg(
        long,
        value_name = "USER",
        help = "User processes run as (name or uid[:gid])"
    )]
    user: Option<String>,
    /// An exposed port, e.g. 8080/tcp; repeatable.
    #[arg(long = "expose", value_name = "PORT[/PROTO]")]
    expose: Vec<String>,
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not K=V")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let image = NewImage {
        reference: args.tag.clone(),
        config: ImageConfig {
            env: args.env,
            entrypoint: args.entrypoint,
            cmd: args.cmd,
            working_dir: args.workdir,
            user: args.user,
            exposed_ports: args.expose,
        },
        layers: vec![LayerInput::dir(&args.rootfs)],
    };
    let start = std::time::Instant::now();
    match write_image(&args.layout, &image) {
        Ok(written) => {
            let layer_bytes: u64 = written.layers.iter().map(|l| l.1).sum();
            println!(
                "{} {} ({} bytes of layers, {:.1}s) in {}",
                args.tag,
                written.manifest_digest,
                layer_bytes,
                start.elapsed().as_secs_f64(),
                args.layout.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("somna-mkimage: {e}");
            ExitCode::FAILURE
        }
    }
}
