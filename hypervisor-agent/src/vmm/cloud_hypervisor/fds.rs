//! Passing file descriptors to Cloud Hypervisor with an API request.
//!
//! Its HTTP server (micro-http) collects `SCM_RIGHTS` descriptors that
//! arrive with a request's bytes and hands them to that request:
//! `vm.add-net` takes them as the TAP queues of the new device, and
//! `vm.restore` as the new TAPs of the devices named in `net_fds`. So the
//! VMM never opens a TAP by name and needs no network privilege: the
//! agent opens the TAP in the sandbox's slot namespace and passes it.
//!
//! hyper writes through any `AsyncWrite`; [`FdPassingStream`] is a Unix
//! stream whose first write goes out with `sendmsg(2)` carrying the
//! descriptors. hyper sends a whole small request in that first write, and
//! the server attaches descriptors to the request being read whatever
//! chunk they came with.

use std::io::IoSlice;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::UnixStream;

/// A Unix stream that sends `fds` with its first write. The caller keeps
/// the descriptors open until the request has been answered.
pub struct FdPassingStream {
    inner: UnixStream,
    pending: Vec<RawFd>,
}

impl FdPassingStream {
    pub fn new(inner: UnixStream, fds: Vec<RawFd>) -> Self {
        FdPassingStream {
            inner,
            pending: fds,
        }
    }
}

impl AsyncRead for FdPassingStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for FdPassingStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.pending.is_empty() || buf.is_empty() {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        loop {
            ready!(self.inner.poll_write_ready(cx))?;
            let (fd, fds) = (self.inner.as_raw_fd(), &self.pending);
            let sent = self.inner.try_io(Interest::WRITABLE, || {
                sendmsg::<()>(
                    fd,
                    &[IoSlice::new(buf)],
                    &[ControlMessage::ScmRights(fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(n) => {
                    // The kernel attached the descriptors to these bytes.
                    self.pending.clear();
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{ControlMessageOwned, recvmsg};
    use std::io::{IoSliceMut, Read, Seek, Write};
    use std::os::fd::FromRawFd;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn the_first_write_carries_the_descriptors() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        file.write_all(b"passed").unwrap();
        let mut stream = FdPassingStream::new(a, vec![file.as_raw_fd()]);
        stream.write_all(b"PUT /x").await.unwrap();
        stream.write_all(b" more").await.unwrap();
        drop(stream);

        let b = b.into_std().unwrap();
        b.set_nonblocking(false).unwrap();
        let mut data = [0u8; 64];
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(&mut data)];
        let msg =
            recvmsg::<()>(b.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).unwrap();
        let n = msg.bytes;
        let fds: Vec<RawFd> = msg
            .cmsgs()
            .unwrap()
            .flat_map(|c| match c {
                ControlMessageOwned::ScmRights(fds) => fds,
                _ => vec![],
            })
            .collect();
        assert_eq!(&data[..n], b"PUT /x");
        assert_eq!(
            fds.len(),
            1,
            "exactly the one descriptor, with the first bytes"
        );
        // SAFETY: the descriptor was just received and is ours.
        let mut received = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        received.rewind().unwrap();
        let mut text = String::new();
        received.read_to_string(&mut text).unwrap();
        assert_eq!(text, "passed");
        // The rest goes without descriptors.
        let mut rest = String::new();
        (&b).read_to_string(&mut rest).unwrap();
        assert_eq!(rest, " more");
    }
}
