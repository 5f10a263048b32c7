//! The HTTP/2 server settings of the agent's channel, in a file of its own
//! (no `crate::` items) so the fuzz targets compile the very same settings.

use hyper_util::rt::TokioExecutor;

/// The SETTINGS_MAX_FRAME_SIZE the agent advertises. Large frames cut the
/// per-frame overhead on the slow serial link; the serial session tracker
/// relies on this bound too (see `h2sync`).
pub const H2_MAX_FRAME_SIZE: u32 = 1 << 20;

/// Tuned for throughput on one stream over a link with real latency (file
/// transfers over virtio-serial): large fixed windows instead of the
/// adaptive BDP probe (its PINGs cost a round trip on a slow link), and no
/// keepalive pings (the host notices a dead VM by other means, and a ping
/// timeout while the VM is paused for a snapshot would kill a good session).
pub fn builder() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .adaptive_window(false)
        .max_frame_size(H2_MAX_FRAME_SIZE)
        .max_send_buf_size(1 << 20)
        .keep_alive_interval(None);
    builder
}
