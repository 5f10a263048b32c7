//! The host side of Cloud Hypervisor's hybrid vsock: the VMM listens on a
//! Unix socket; a host connection asks for a guest port with
//! `CONNECT <port>\n` and, once the guest accepted, gets `OK <host port>\n`.
//! After that it is a plain byte stream to the guest (no sync marker: each
//! connection is a fresh stream, unlike a virtio-serial port). If nothing
//! listens on that port in the guest, the VMM closes the connection.
//! Connections do not survive a snapshot/restore: after a restore the host
//! simply connects again.

use std::io;
use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// The longest acknowledgement line accepted (`OK 4294967295\n` is 14).
const MAX_ACK: usize = 32;

/// Connects to guest vsock `port` through the VMM's socket.
pub async fn connect(socket: &Path, port: u32) -> io::Result<UnixStream> {
    let mut stream = UnixStream::connect(socket).await.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!(
                "connect to the hybrid vsock socket {}: {e}",
                socket.display()
            ),
        )
    })?;
    handshake(&mut stream, port).await?;
    Ok(stream)
}

/// Sends `CONNECT <port>` and reads the `OK` line one byte at a time, so
/// that nothing the guest sends after it is consumed here.
pub async fn handshake<S>(stream: &mut S, port: u32) -> io::Result<u32>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    // The VMM closes the connection when nothing listens on the port;
    // depending on timing that shows as a failed write, a reset or EOF.
    let closed = |e: io::Error| match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => refused(port),
        _ => e,
    };
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(closed)?;
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).await.map_err(closed)? == 0 {
            return Err(refused(port));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_ACK {
            return Err(bad_ack(&line, port));
        }
    }
    let text = String::from_utf8_lossy(&line);
    text.strip_prefix("OK ")
        .and_then(|p| p.trim().parse::<u32>().ok())
        .ok_or_else(|| bad_ack(&line, port))
}

fn refused(port: u32) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!(
            "nothing accepted the connection on guest vsock port {port} (the guest agent is not listening yet, or the guest is gone)"
        ),
    )
}

fn bad_ack(line: &[u8], port: u32) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the VMM answered {:?} to CONNECT {port} (expected OK <port>)",
            String::from_utf8_lossy(line)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn handshake_stops_at_the_ack_line() {
        let (mut host, mut vmm) = tokio::io::duplex(64);
        let guest = tokio::spawn(async move {
            let mut buf = [0u8; 13];
            vmm.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            vmm.write_all(b"OK 1073741824\nPRI * HTTP/2.0")
                .await
                .unwrap();
            vmm
        });
        assert_eq!(handshake(&mut host, 1024).await.unwrap(), 1_073_741_824);
        let mut rest = [0u8; 14];
        host.read_exact(&mut rest).await.unwrap();
        assert_eq!(
            &rest, b"PRI * HTTP/2.0",
            "bytes after the ack stay in the stream"
        );
        drop(guest.await.unwrap());
    }

    #[tokio::test]
    async fn refused_and_garbled_answers_are_errors() {
        let (mut host, vmm) = tokio::io::duplex(64);
        drop(vmm);
        let err = handshake(&mut host, 1024).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
        assert!(err.to_string().contains("port 1024"), "{err}");

        let (mut host, mut vmm) = tokio::io::duplex(64);
        tokio::spawn(async move {
            let mut buf = [0u8; 13];
            let _ = vmm.read_exact(&mut buf).await;
            let _ = vmm.write_all(b"NO\n").await;
        });
        let err = handshake(&mut host, 1024).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
