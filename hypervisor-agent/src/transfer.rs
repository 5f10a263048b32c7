//! Size limits on what crosses the host/guest boundary: exec output (cut
//! off with a marker, the process keeps running) and file transfers
//! (refused with RESOURCE_EXHAUSTED). The guest is untrusted, so the host
//! enforces them; a guest that writes forever costs the host CPU to drain,
//! never memory or client bandwidth.

use futures::{Stream, StreamExt};
use somna_proto::v1::exec_response::Event;
use somna_proto::v1::{ExecResponse, FileChunk};
use tonic::Status;

/// The host's limits on one exec's output and one file transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferLimits {
    pub max_exec_output_bytes: u64,
    pub max_file_bytes: u64,
}

impl Default for TransferLimits {
    fn default() -> Self {
        TransferLimits {
            max_exec_output_bytes: 64 << 20,
            max_file_bytes: 2 << 30,
        }
    }
}

impl TransferLimits {
    /// The limit for one exec: the request's, capped by the host's.
    pub fn exec_output(&self, requested: u64) -> u64 {
        match requested {
            0 => self.max_exec_output_bytes,
            n => n.min(self.max_exec_output_bytes),
        }
    }
}

/// The marker written to stderr where output was cut off.
pub fn truncation_marker(limit: u64) -> String {
    format!(
        "\n[somna: output truncated: this command wrote more than {limit} bytes of stdout and stderr; the rest was discarded (raise ExecStart.max_output_bytes up to the host's --max-exec-output-mib)]\n"
    )
}

/// Passes `inner` on until `limit` bytes of output have gone through, then
/// a marker, then only non-output events; the exit says it was truncated.
pub fn limit_output(
    inner: impl Stream<Item = Result<ExecResponse, Status>> + Send + 'static,
    limit: u64,
) -> impl Stream<Item = Result<ExecResponse, Status>> + Send + 'static {
    let mut seen: u64 = 0;
    let mut truncated = false;
    inner.filter_map(move |item| {
        let out = match item {
            Ok(ExecResponse {
                event: Some(Event::Stdout(_) | Event::Stderr(_)),
            }) if truncated => None,
            Ok(ExecResponse {
                event: Some(ev @ (Event::Stdout(_) | Event::Stderr(_))),
            }) => {
                let (is_out, mut data) = match ev {
                    Event::Stdout(d) => (true, d),
                    Event::Stderr(d) => (false, d),
                    _ => unreachable!("matched above"),
                };
                let room = limit.saturating_sub(seen);
                seen = seen.saturating_add(data.len() as u64);
                if data.len() as u64 > room {
                    truncated = true;
                    data.truncate(room as usize);
                    let mut head = data;
                    let marker = truncation_marker(limit).into_bytes();
                    // The marker follows the kept head in the same event
                    // (one event in, one out); with nothing kept from a
                    // stdout chunk it goes to stderr.
                    if is_out {
                        if head.is_empty() {
                            Some(Ok(ExecResponse {
                                event: Some(Event::Stderr(marker)),
                            }))
                        } else {
                            head.extend_from_slice(&marker);
                            Some(Ok(ExecResponse {
                                event: Some(Event::Stdout(head)),
                            }))
                        }
                    } else {
                        head.extend_from_slice(&marker);
                        Some(Ok(ExecResponse {
                            event: Some(Event::Stderr(head)),
                        }))
                    }
                } else {
                    Some(Ok(ExecResponse {
                        event: Some(if is_out {
                            Event::Stdout(data)
                        } else {
                            Event::Stderr(data)
                        }),
                    }))
                }
            }
            Ok(ExecResponse {
                event: Some(Event::Exit(mut exit)),
            }) => {
                if truncated {
                    exit.output_truncated = true;
                    let note = format!("output truncated after {limit} bytes");
                    exit.message = if exit.message.is_empty() {
                        note
                    } else {
                        format!("{}; {note}", exit.message)
                    };
                }
                Some(Ok(ExecResponse {
                    event: Some(Event::Exit(exit)),
                }))
            }
            other => Some(other),
        };
        std::future::ready(out)
    })
}

/// Passes file chunks on until more than `limit` bytes have come, then
/// fails with RESOURCE_EXHAUSTED and ends.
pub fn limit_read(
    inner: impl Stream<Item = Result<FileChunk, Status>> + Send + 'static,
    path: String,
    limit: u64,
) -> impl Stream<Item = Result<FileChunk, Status>> + Send + 'static {
    let mut seen: u64 = 0;
    inner
        .map(move |item| match item {
            Ok(chunk) => {
                seen = seen.saturating_add(chunk.data.len() as u64);
                if seen > limit {
                    Err(too_large(&path, limit))
                } else {
                    Ok(chunk)
                }
            }
            Err(e) => Err(e),
        })
        .scan(false, |ended, item| {
            // Nothing after the error.
            if *ended {
                return std::future::ready(None);
            }
            *ended = item.is_err();
            std::future::ready(Some(item))
        })
}

pub fn too_large(path: &str, limit: u64) -> Status {
    Status::resource_exhausted(format!(
        "file transfer of {path} is larger than this host's limit of {limit} bytes (--max-file-mib); read it in ranges (offset/length) or split it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use somna_proto::v1::ExecExit;

    fn out(b: &[u8]) -> Result<ExecResponse, Status> {
        Ok(ExecResponse {
            event: Some(Event::Stdout(b.to_vec())),
        })
    }

    #[tokio::test]
    async fn output_is_cut_at_the_limit_with_a_marker_and_flag() {
        let events = vec![
            out(b"12345"),
            out(b"67890"),
            out(b"LATE"),
            Ok(ExecResponse {
                event: Some(Event::Exit(ExecExit::default())),
            }),
        ];
        let got: Vec<_> = limit_output(futures::stream::iter(events), 7)
            .collect::<Vec<_>>()
            .await;
        let mut stdout = Vec::new();
        let mut exit = None;
        for e in got {
            match e.unwrap().event.unwrap() {
                Event::Stdout(d) | Event::Stderr(d) => stdout.extend(d),
                Event::Exit(x) => exit = Some(x),
                _ => {}
            }
        }
        let text = String::from_utf8(stdout).unwrap();
        assert!(
            text.starts_with("1234567\n[somna: output truncated"),
            "{text}"
        );
        assert!(!text.contains("LATE"));
        let exit = exit.unwrap();
        assert!(exit.output_truncated);
        assert!(exit.message.contains("truncated after 7 bytes"));
    }

    #[tokio::test]
    async fn output_under_the_limit_is_untouched() {
        let events = vec![
            out(b"abc"),
            Ok(ExecResponse {
                event: Some(Event::Exit(ExecExit::default())),
            }),
        ];
        let got: Vec<_> = limit_output(futures::stream::iter(events), 3)
            .collect::<Vec<_>>()
            .await;
        assert_eq!(got.len(), 2);
        match &got[1].as_ref().unwrap().event {
            Some(Event::Exit(x)) => assert!(!x.output_truncated),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn reads_past_the_limit_fail_once() {
        let chunks = (0..5).map(|_| Ok(FileChunk { data: vec![0; 10] }));
        let got: Vec<_> = limit_read(futures::stream::iter(chunks), "/f".into(), 25)
            .collect::<Vec<_>>()
            .await;
        assert_eq!(got.len(), 3);
        assert!(got[0].is_ok() && got[1].is_ok());
        let e = got[2].as_ref().unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("/f"));
    }

    #[test]
    fn requested_limits_are_capped_by_the_host() {
        let l = TransferLimits {
            max_exec_output_bytes: 100,
            max_file_bytes: 1,
        };
        assert_eq!(l.exec_output(0), 100);
        assert_eq!(l.exec_output(10), 10);
        assert_eq!(l.exec_output(1000), 100);
    }
}
