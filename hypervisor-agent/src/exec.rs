//! Exec and file calls on a sandbox: wake it if it sleeps, fill the exec
//! defaults, relay to the guest agent, and count the activity (idle
//! detection). An exec stream whose VM goes to sleep or away ends with a
//! clear error instead of a broken connection.

use std::sync::Arc;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use somna_proto::guest::v1::guest_agent_client::GuestAgentClient;
use somna_proto::v1::{
    ExecRequest, ExecResponse, ExecStart, FileChunk, ReadFileRequest, WriteFileRequest,
    WriteFileResponse, WriteFileStart,
};
use tonic::Status;
use tonic::transport::Channel;

use crate::agent::Agent;
use crate::error::AgentError;

pub type StatusStream<T> = BoxStream<'static, Result<T, Status>>;

impl Agent {
    /// Runs a process in the sandbox `start.sandbox_id`; `rest` are the
    /// client's further messages (stdin, signals, resizes).
    pub async fn exec(
        self: &Arc<Self>,
        mut start: ExecStart,
        rest: BoxStream<'static, ExecRequest>,
    ) -> Result<StatusStream<ExecResponse>, AgentError> {
        let sandbox = self.lookup(&start.sandbox_id)?;
        sandbox.apply_exec_defaults(&mut start);
        if start.argv.is_empty() || start.argv[0].is_empty() {
            return Err(AgentError::InvalidArgument(
                "exec needs a command: argv is empty and the image has no Entrypoint or Cmd".into(),
            ));
        }
        let output_limit = self.config.transfer.exec_output(start.max_output_bytes);
        // The guest stops sending past it too (it is only spared work: the
        // cut is made here).
        start.max_output_bytes = output_limit;
        let (sandbox, live) = self.awake(&start.sandbox_id).await?;
        let id = start.sandbox_id.clone();
        let guard = sandbox.activity.begin();
        let mut epoch = sandbox.epoch.subscribe();
        epoch.borrow_and_update();
        let first = ExecRequest {
            msg: Some(somna_proto::v1::exec_request::Msg::Start(start)),
        };
        let responses = live
            .guest
            .rpc()
            .exec(relay(first, rest))
            .await
            .map_err(AgentError::Guest)?
            .into_inner();
        crate::fault::point("exec.started");
        let activity = sandbox.activity.clone();
        // End the stream with an explanation when the VM stops under it.
        let stopped = async move {
            let _ = epoch.changed().await;
            Status::aborted(format!(
                "sandbox {id} was put to sleep or destroyed while this command ran; its output after that point is lost"
            ))
        };
        let limited = crate::transfer::limit_output(responses, output_limit);
        let stream = until_stopped(limited, stopped).map(move |item| {
            let _keep = &guard;
            activity.touch();
            item
        });
        Ok(stream.boxed())
    }

    /// The guest client of a sandbox for a file call, waking it if it
    /// sleeps.
    pub async fn files(
        self: &Arc<Self>,
        id: &str,
    ) -> Result<GuestAgentClient<Channel>, AgentError> {
        let (_, live) = self.awake(id).await?;
        Ok(live.guest.rpc())
    }

    /// Reads a file, failing with RESOURCE_EXHAUSTED past the host's file
    /// transfer limit (a guest can serve an endless file).
    pub async fn read_file(
        self: &Arc<Self>,
        req: ReadFileRequest,
    ) -> Result<StatusStream<FileChunk>, AgentError> {
        let limit = self.config.transfer.max_file_bytes;
        let path = req.path.clone();
        let chunks = self
            .files(&req.sandbox_id)
            .await?
            .read_file(req)
            .await
            .map_err(AgentError::Guest)?
            .into_inner();
        Ok(crate::transfer::limit_read(chunks, path, limit).boxed())
    }

    /// Writes a file: `start` was the client's first message, `rest` the
    /// data chunks.
    pub async fn write_file(
        self: &Arc<Self>,
        start: WriteFileStart,
        rest: BoxStream<'static, WriteFileRequest>,
    ) -> Result<WriteFileResponse, AgentError> {
        let (sandbox, live) = self.awake(&start.sandbox_id).await?;
        let _guard = sandbox.activity.begin();
        let limit = self.config.transfer.max_file_bytes;
        let path = start.path.clone();
        let first = WriteFileRequest {
            msg: Some(somna_proto::v1::write_file_request::Msg::Start(
                start.clone(),
            )),
        };
        // Past the limit, a second `start` makes the guest abandon the
        // write (it refuses one mid-stream) and the client hears why.
        let over = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = over.clone();
        let mut seen: u64 = 0;
        let rest = rest
            .scan(false, move |stop, msg| {
                if *stop {
                    return std::future::ready(None);
                }
                if let Some(somna_proto::v1::write_file_request::Msg::Data(d)) = &msg.msg {
                    seen = seen.saturating_add(d.len() as u64);
                    if seen > limit {
                        *stop = true;
                        flag.store(true, std::sync::atomic::Ordering::SeqCst);
                        return std::future::ready(Some(WriteFileRequest {
                            msg: Some(somna_proto::v1::write_file_request::Msg::Start(
                                start.clone(),
                            )),
                        }));
                    }
                }
                std::future::ready(Some(msg))
            })
            .boxed();
        let result = live.guest.rpc().write_file(relay(first, rest)).await;
        if over.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AgentError::Guest(crate::transfer::too_large(&path, limit)));
        }
        Ok(result.map_err(AgentError::Guest)?.into_inner())
    }
}

/// `inner` until `stop` resolves; then `stop`'s error, then the end.
fn until_stopped<T: Send + 'static>(
    inner: impl Stream<Item = Result<T, Status>> + Send + 'static,
    stop: impl std::future::Future<Output = Status> + Send + 'static,
) -> impl Stream<Item = Result<T, Status>> + Send + 'static {
    futures::stream::unfold(
        (Box::pin(inner), Box::pin(stop), false),
        |(mut inner, mut stop, done)| async move {
            if done {
                return None;
            }
            tokio::select! {
                biased;
                item = inner.next() => item.map(|i| (i, (inner, stop, false))),
                status = &mut stop => Some((Err(status), (inner, stop, true))),
            }
        },
    )
}

/// `first` followed by `rest`, as a concrete stream type. (Passing a
/// combinator chain over a boxed stream to the generated client trips a
/// compiler limitation with higher-ranked lifetimes in async traits.)
fn relay<T: Send + 'static>(
    first: T,
    mut rest: BoxStream<'static, T>,
) -> tokio_stream::wrappers::ReceiverStream<T> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        if tx.send(first).await.is_err() {
            return;
        }
        while let Some(item) = rest.next().await {
            if tx.send(item).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
