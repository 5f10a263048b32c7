//! Async byte streams over raw non-blocking file descriptors (pipes, the PTY
//! master, the virtio-serial port, vsock sockets), driven by tokio's reactor.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Puts `fd` into non-blocking mode (required before registering it).
pub fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// A registered descriptor that can be shared by successive streams (the
/// serial port outlives each HTTP/2 session on it).
pub type SharedFd = Arc<AsyncFd<OwnedFd>>;

/// Registers a non-blocking `fd` with the reactor.
pub fn register(fd: OwnedFd) -> io::Result<SharedFd> {
    set_nonblocking(&fd)?;
    // SAFETY: the AsyncFd owns the descriptor, so it stays open (and is not
    // replaced) for as long as it is registered.
    Ok(Arc::new(unsafe { AsyncFd::register(fd)? }))
}

/// AsyncRead + AsyncWrite over a registered descriptor.
pub struct FdStream {
    fd: SharedFd,
    /// A PTY master reports EIO once the last slave is closed; that is its
    /// end of file.
    eio_is_eof: bool,
}

impl FdStream {
    pub fn new(fd: SharedFd) -> FdStream {
        FdStream {
            fd,
            eio_is_eof: false,
        }
    }

    pub fn from_owned(fd: OwnedFd) -> io::Result<FdStream> {
        Ok(FdStream::new(register(fd)?))
    }

    pub fn pty_master(fd: OwnedFd) -> io::Result<FdStream> {
        Ok(FdStream {
            fd: register(fd)?,
            eio_is_eof: true,
        })
    }
}

/// One non-blocking read into `buf`, waiting for readiness as needed.
///
/// tokio treats a hang-up (EPOLLHUP) as final: from then on the descriptor
/// always polls ready. That holds for pipes and sockets, where reads then
/// return 0, but not for a virtio-serial port, whose host may reconnect:
/// reads would return EAGAIN forever and this loop would spin. So "would
/// block" after a hang-up is reported as end of file; the serial channel
/// then registers the port afresh for its next session.
pub fn poll_read_fd(
    fd: &AsyncFd<OwnedFd>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
    eio_is_eof: bool,
) -> Poll<io::Result<()>> {
    if buf.remaining() == 0 {
        // A zero-length read would return 0 and look like end of file.
        return Poll::Ready(Ok(()));
    }
    loop {
        let mut guard = ready!(fd.poll_read_ready(cx))?;
        let hung_up = guard.ready().is_read_closed();
        let unfilled = buf.initialize_unfilled();
        let res = guard.try_io(|inner| {
            // SAFETY: `unfilled` is a valid, initialized, writable buffer of
            // the given length for the duration of the call.
            let n = unsafe {
                libc::read(
                    inner.as_raw_fd(),
                    unfilled.as_mut_ptr().cast(),
                    unfilled.len(),
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match res {
            Ok(Ok(n)) => {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Ok(Err(e)) if eio_is_eof && e.raw_os_error() == Some(libc::EIO) => {
                return Poll::Ready(Ok(()));
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(Err(e)) => return Poll::Ready(Err(e)),
            Err(_would_block) if hung_up => return Poll::Ready(Ok(())),
            // WouldBlock: readiness was cleared, wait again.
            Err(_would_block) => continue,
        }
    }
}

/// One non-blocking write of `buf`, waiting for readiness as needed. After a
/// hang-up, "would block" is reported as a broken pipe (see `poll_read_fd`).
pub fn poll_write_fd(
    fd: &AsyncFd<OwnedFd>,
    cx: &mut Context<'_>,
    buf: &[u8],
) -> Poll<io::Result<usize>> {
    loop {
        let mut guard = ready!(fd.poll_write_ready(cx))?;
        let hung_up = guard.ready().is_write_closed();
        let res = guard.try_io(|inner| {
            // SAFETY: `buf` is valid for reads of its length.
            let n = unsafe { libc::write(inner.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match res {
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            Ok(r) => return Poll::Ready(r),
            Err(_would_block) if hung_up => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the peer hung up",
                )));
            }
            Err(_would_block) => continue,
        }
    }
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        poll_read_fd(&self.fd, cx, buf, self.eio_is_eof)
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        poll_write_fd(&self.fd, cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Writes go straight to the descriptor; nothing is buffered here.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Closing happens when the descriptor is dropped (a shared serial
        // port must stay open across sessions).
        Poll::Ready(Ok(()))
    }
}
