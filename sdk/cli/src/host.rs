//! `somna host ls`: hosts, their accelerator, templates and warm pools.

use clap::Subcommand;
use serde_json::json;
use somna_sdk::Client;

use crate::output::table;

#[derive(Subcommand)]
pub enum HostCommand {
    /// List hosts with their sandboxes, templates and warm pools.
    #[command(alias = "list")]
    Ls,
}

pub async fn run(cmd: HostCommand, addr: &str, json_out: bool) -> anyhow::Result<i32> {
    let client = Client::connect(addr).await?;
    match cmd {
        HostCommand::Ls => {
            let hosts = client.list_hosts().await?;
            if json_out {
                let v: Vec<_> = hosts
                    .iter()
                    .map(|h| {
                        json!({
                            "id": h.id,
                            "state": h.state,
                            "cpus": h.cpus,
                            "memory_mib": h.memory_mib,
                            "cpus_allocated": h.cpus_allocated,
                            "memory_allocated_mib": h.memory_allocated_mib,
                            "cached_images": h.cached_images,
                            "capabilities": h.capabilities,
                            "vmm": h.vmm,
                            "accelerator": h.accelerator,
                            "accelerator_reason": h.accelerator_reason,
                            "sandboxes_running": h.sandboxes_running,
                            "sandboxes_sleeping": h.sandboxes_sleeping,
                            "templates": h.templates.iter().map(|t| json!({
                                "image": t.image, "image_digest": t.image_digest, "cpus": t.cpus,
                                "memory_mib": t.memory_mib, "disk_mib": t.disk_mib,
                                "size_bytes": t.size_bytes, "clones": t.clones,
                            })).collect::<Vec<_>>(),
                            "warm_pools": h.warm_pools.iter().map(|p| json!({
                                "image": p.image, "cpus": p.cpus, "memory_mib": p.memory_mib,
                                "disk_mib": p.disk_mib, "target": p.target, "ready": p.ready,
                            })).collect::<Vec<_>>(),
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = hosts
                .iter()
                .map(|h| {
                    vec![
                        h.id.clone(),
                        h.state.clone(),
                        format!("{}/{}", h.cpus_allocated, h.cpus),
                        format!("{}/{}", h.memory_allocated_mib, h.memory_mib),
                        format!("{} ({})", h.accelerator, h.vmm),
                        h.sandboxes_running.to_string(),
                        h.sandboxes_sleeping.to_string(),
                        h.templates.len().to_string(),
                        h.warm_pools
                            .iter()
                            .map(|p| format!("{} {}/{}", p.image, p.ready, p.target))
                            .collect::<Vec<_>>()
                            .join(", "),
                    ]
                })
                .collect();
            table(
                &[
                    "HOST",
                    "STATE",
                    "VCPUS",
                    "MEMORY MIB",
                    "ACCEL",
                    "RUNNING",
                    "SLEEPING",
                    "TEMPLATES",
                    "WARM POOLS (ready/target)",
                ],
                &rows,
            );
            for h in &hosts {
                for t in &h.templates {
                    println!(
                        "  template {} {}vCPU {}MiB: {} clones, {} MiB on disk",
                        t.image,
                        t.cpus,
                        t.memory_mib,
                        t.clones,
                        t.size_bytes / (1024 * 1024)
                    );
                }
            }
            Ok(0)
        }
    }
}
