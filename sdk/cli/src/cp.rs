//! `somna sandbox cp`: files and directory trees between this machine and a
//! sandbox.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use somna_sdk::proto::FileType;
use somna_sdk::{Client, Sandbox, WriteOptions};

#[derive(Args)]
pub struct CpArgs {
    /// LOCAL_PATH, `-` (stdin) or SANDBOX_ID:PATH.
    src: String,
    /// LOCAL_PATH, `-` (stdout) or SANDBOX_ID:PATH.
    dst: String,
}

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
enum Location {
    Local(PathBuf),
    Std,
    Remote { id: String, path: String },
}

/// `ID:PATH` is remote when the part before the first ':' has no '/' (so
/// `./a:b` and `/tmp/x:y` stay local), like `docker cp`.
fn parse_location(s: &str) -> Location {
    if s == "-" {
        return Location::Std;
    }
    match s.split_once(':') {
        Some((id, path)) if !id.is_empty() && !id.contains('/') => Location::Remote {
            id: id.to_string(),
            path: if path.is_empty() {
                "/".into()
            } else {
                path.to_string()
            },
        },
        _ => Location::Local(PathBuf::from(s)),
    }
}

pub async fn run(client: &Client, args: CpArgs, json: bool) -> anyhow::Result<()> {
    let (bytes, files) = match (parse_location(&args.src), parse_location(&args.dst)) {
        (Location::Remote { id, path }, Location::Local(local)) => {
            let sb = client.sandbox(&id).await?;
            download(&sb, &path, &local).await?
        }
        (Location::Remote { id, path }, Location::Std) => {
            let sb = client.sandbox(&id).await?;
            let n = sb.read_file_to(&path, tokio::io::stdout()).await?;
            (n, 1)
        }
        (Location::Local(local), Location::Remote { id, path }) => {
            let sb = client.sandbox(&id).await?;
            upload(&sb, &local, &path).await?
        }
        (Location::Std, Location::Remote { id, path }) => {
            let sb = client.sandbox(&id).await?;
            let opts = WriteOptions {
                create_parents: true,
                ..Default::default()
            };
            let info = sb.write_file_from(&path, tokio::io::stdin(), opts).await?;
            (info.size, 1)
        }
        (Location::Remote { .. }, Location::Remote { .. }) => {
            bail!("copying between two sandboxes is not supported; copy to this machine first")
        }
        _ => bail!("one side of cp must be a sandbox path, written SANDBOX_ID:PATH"),
    };
    if json {
        println!("{}", serde_json::json!({ "bytes": bytes, "files": files }));
    }
    Ok(())
}

/// Local file or tree → sandbox. A file copied onto an existing remote
/// directory lands inside it, like cp.
async fn upload(sb: &Sandbox, local: &Path, remote: &str) -> anyhow::Result<(u64, u64)> {
    let meta = tokio::fs::metadata(local)
        .await
        .with_context(|| format!("cannot read {}", local.display()))?;
    let mut target = remote.to_string();
    if let Ok(info) = sb.stat(remote).await
        && info.r#type() == FileType::Directory
    {
        let name = local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        target = join(remote, &name);
    }
    if meta.is_dir() {
        return upload_tree(sb, local, &target).await;
    }
    let n = upload_file(sb, local, &target, meta.permissions()).await?;
    Ok((n, 1))
}

async fn upload_file(
    sb: &Sandbox,
    local: &Path,
    remote: &str,
    perms: std::fs::Permissions,
) -> anyhow::Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    let file = tokio::fs::File::open(local)
        .await
        .with_context(|| format!("cannot open {}", local.display()))?;
    let opts = WriteOptions {
        mode: perms.mode() & 0o7777,
        create_parents: true,
        append: false,
    };
    let info = sb.write_file_from(remote, file, opts).await?;
    Ok(info.size)
}

async fn upload_tree(sb: &Sandbox, local: &Path, remote: &str) -> anyhow::Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    let mut stack = vec![(local.to_path_buf(), remote.to_string())];
    while let Some((dir, rdir)) = stack.pop() {
        sb.make_dir(&rdir, true).await?;
        let mut entries = tokio::fs::read_dir(&dir)
            .await
            .with_context(|| format!("cannot read {}", dir.display()))?;
        while let Some(entry) = entries.next_entry().await? {
            let path = entry.path();
            let rpath = join(&rdir, &entry.file_name().to_string_lossy());
            let ft = entry.file_type().await?;
            if ft.is_dir() {
                stack.push((path, rpath));
            } else if ft.is_file() {
                bytes +=
                    upload_file(sb, &path, &rpath, entry.metadata().await?.permissions()).await?;
                files += 1;
            } else {
                eprintln!(
                    "somna: skipping {} (not a regular file or directory)",
                    path.display()
                );
            }
        }
    }
    Ok((bytes, files))
}

/// Sandbox file or tree → local. Onto an existing local directory, the
/// source lands inside it.
async fn download(sb: &Sandbox, remote: &str, local: &Path) -> anyhow::Result<(u64, u64)> {
    let info = sb.stat(remote).await?;
    let mut target = local.to_path_buf();
    if target.is_dir() {
        target = target.join(if info.name.is_empty() {
            "root".to_string()
        } else {
            info.name.clone()
        });
    }
    match info.r#type() {
        FileType::Directory => download_tree(sb, remote, &target).await,
        FileType::File => Ok((download_file(sb, remote, &target, info.mode).await?, 1)),
        _ => bail!("{remote} is not a regular file or directory"),
    }
}

async fn download_file(sb: &Sandbox, remote: &str, local: &Path, mode: u32) -> anyhow::Result<u64> {
    use std::os::unix::fs::PermissionsExt;
    let file = tokio::fs::File::create(local)
        .await
        .with_context(|| format!("cannot create {}", local.display()))?;
    let n = sb.read_file_to(remote, file).await?;
    if mode != 0 {
        tokio::fs::set_permissions(local, std::fs::Permissions::from_mode(mode & 0o7777)).await?;
    }
    Ok(n)
}

async fn download_tree(sb: &Sandbox, remote: &str, local: &Path) -> anyhow::Result<(u64, u64)> {
    let (mut bytes, mut files) = (0, 0);
    let mut stack = vec![(remote.to_string(), local.to_path_buf())];
    while let Some((rdir, dir)) = stack.pop() {
        tokio::fs::create_dir_all(&dir)
            .await
            .with_context(|| format!("cannot create {}", dir.display()))?;
        for entry in sb.list_files(&rdir).await? {
            let target = dir.join(&entry.name);
            match entry.r#type() {
                FileType::Directory => stack.push((entry.path.clone(), target)),
                FileType::File => {
                    bytes += download_file(sb, &entry.path, &target, entry.mode).await?;
                    files += 1;
                }
                _ => eprintln!(
                    "somna: skipping {} (not a regular file or directory)",
                    entry.path
                ),
            }
        }
    }
    Ok((bytes, files))
}

fn join(dir: &str, name: &str) -> String {
    format!("{}/{}", dir.trim_end_matches('/'), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(parse_location("-"), Location::Std);
        assert_eq!(
            parse_location("sbx-1:/tmp/a"),
            Location::Remote {
                id: "sbx-1".into(),
                path: "/tmp/a".into()
            }
        );
        assert_eq!(
            parse_location("sbx-1:"),
            Location::Remote {
                id: "sbx-1".into(),
                path: "/".into()
            }
        );
        assert_eq!(parse_location("./a:b"), Location::Local("./a:b".into()));
        assert_eq!(
            parse_location("/tmp/x:y"),
            Location::Local("/tmp/x:y".into())
        );
        assert_eq!(
            parse_location("file.txt"),
            Location::Local("file.txt".into())
        );
        assert_eq!(join("/", "a"), "/a");
        assert_eq!(join("/tmp/", "a"), "/tmp/a");
    }
}
