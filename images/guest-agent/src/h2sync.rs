//! Finding HTTP/2 session boundaries in the serial port's byte stream.
//!
//! A virtio-serial port is one byte stream that outlives host connections.
//! Bytes of a dead session may still sit in the port when a new host client
//! connects, and after a VM snapshot/restore the guest may never observe the
//! disconnect at all: the new client's preface simply arrives on the old,
//! half-read session. Two mechanisms keep such leftovers from wedging the
//! agent:
//!
//! - [`PrefaceScanner`]: a session starts only at an HTTP/2 client preface
//!   (`PRI * HTTP/2.0...`); anything before it is stale and discarded.
//! - [`FrameTracker`]: while a session runs, the client's frame boundaries are
//!   tracked (9-byte header, 24-bit length). A frame can never be longer than
//!   the maximum frame size the agent advertised, so its first length byte is
//!   at most `max_frame >> 16` (0x10 for 1 MiB). The preface's first byte is
//!   `P` (0x50), so a preface at a frame boundary is unambiguous: the old
//!   session is over and the new one starts there. Payload bytes are skipped,
//!   never inspected, so file data that happens to contain a preface is safe.
//!
//! The tracker also notices the client's GOAWAY. After it the agent stops
//! writing to the port: the client is closing the connection, so nothing
//! written can help it, and bytes written once the *next* client has
//! connected would reach that client ahead of its own session's SETTINGS.

/// The HTTP/2 client connection preface (RFC 9113, section 3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const FRAME_HEADER_LEN: usize = 9;
/// HTTP/2 frame type GOAWAY.
const FRAME_GOAWAY: u8 = 0x7;

/// Follows client→server HTTP/2 framing, starting at the preface.
#[derive(Debug, Clone)]
pub struct FrameTracker {
    /// The largest first length byte a legitimate frame can have.
    max_len_hi: u8,
    state: TrackState,
    /// The client sent GOAWAY.
    pub goaway: bool,
}

#[derive(Debug, Clone, Copy)]
enum TrackState {
    /// Inside the 24-byte preface; this many bytes of it remain.
    Preface(usize),
    /// Inside a frame header; `have` bytes seen, `len` accumulated from the
    /// first three.
    Header { have: usize, len: u32 },
    /// Inside a frame header after its type byte.
    HeaderRest { have: usize, len: u32 },
    /// Inside a payload; this many bytes remain.
    Payload(u32),
}

impl FrameTracker {
    /// `max_frame` is the SETTINGS_MAX_FRAME_SIZE the server advertises.
    pub fn new(max_frame: u32) -> FrameTracker {
        FrameTracker {
            max_len_hi: (max_frame >> 16).min(0xff) as u8,
            state: TrackState::Preface(PREFACE.len()),
            goaway: false,
        }
    }

    /// Consumes `data`. Returns the offset in `data` at which a frame header
    /// is impossible, i.e. where a new session (or garbage) begins.
    pub fn feed(&mut self, data: &[u8]) -> Option<usize> {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                TrackState::Preface(left) => {
                    let n = left.min(data.len() - i);
                    i += n;
                    self.state = if left == n {
                        TrackState::Header { have: 0, len: 0 }
                    } else {
                        TrackState::Preface(left - n)
                    };
                }
                TrackState::Header { have, len } => {
                    let b = data[i];
                    if have == 0 && b > self.max_len_hi {
                        return Some(i);
                    }
                    i += 1;
                    self.state = if have < 3 {
                        TrackState::Header {
                            have: have + 1,
                            len: (len << 8) | b as u32,
                        }
                    } else {
                        // have == 3: the type byte.
                        self.goaway |= b == FRAME_GOAWAY;
                        TrackState::HeaderRest {
                            have: have + 1,
                            len,
                        }
                    };
                }
                TrackState::HeaderRest { have, len } => {
                    i += 1;
                    self.state = if have + 1 < FRAME_HEADER_LEN {
                        TrackState::HeaderRest {
                            have: have + 1,
                            len,
                        }
                    } else if len == 0 {
                        TrackState::Header { have: 0, len: 0 }
                    } else {
                        TrackState::Payload(len)
                    };
                }
                TrackState::Payload(left) => {
                    let n = (left as usize).min(data.len() - i);
                    i += n;
                    let left = left - n as u32;
                    self.state = if left == 0 {
                        TrackState::Header { have: 0, len: 0 }
                    } else {
                        TrackState::Payload(left)
                    };
                }
            }
        }
        None
    }
}

/// What [`PrefaceScanner::push`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// An HTTP/2 client preface: the bytes from it on.
    Preface(Vec<u8>),
    /// A host's resynchronisation marker (see `somna_proto::serial_sync`),
    /// to be echoed; `rest` are the bytes after it, to scan next.
    Sync { marker: Vec<u8>, rest: Vec<u8> },
}

/// Looks for the preface (or a sync marker) in a stream of chunks,
/// discarding what precedes it.
#[derive(Debug, Default)]
pub struct PrefaceScanner {
    /// The unmatched tail kept between chunks.
    buf: Vec<u8>,
    /// Bytes thrown away so far (for the log).
    pub discarded: usize,
}

impl PrefaceScanner {
    /// Adds `chunk`. Returns what was found first, with what follows it.
    pub fn push(&mut self, chunk: &[u8]) -> Option<Found> {
        use somna_proto::serial_sync;
        self.buf.extend_from_slice(chunk);
        let preface = self.buf.windows(PREFACE.len()).position(|w| w == PREFACE);
        // The first complete marker, or the start of one still arriving.
        let mut marker = None;
        let mut partial = None;
        let mut from = 0;
        while let Some(off) = self.buf[from..]
            .windows(serial_sync::PREFIX.len())
            .position(|w| w == serial_sync::PREFIX)
        {
            let at = from + off;
            if self.buf.len() - at < serial_sync::LEN {
                partial = Some(at);
                break;
            }
            if serial_sync::is_marker(&self.buf[at..at + serial_sync::LEN]) {
                marker = Some(at);
                break;
            }
            from = at + 1;
        }
        match (preface, marker) {
            (Some(p), m) if m.is_none_or(|m| p < m) => {
                self.discarded += p;
                Some(Found::Preface(self.buf.split_off(p)))
            }
            (_, Some(m)) => {
                self.discarded += m;
                let mut tail = self.buf.split_off(m);
                let rest = tail.split_off(serial_sync::LEN);
                self.buf.clear();
                Some(Found::Sync { marker: tail, rest })
            }
            _ => {
                // Keep only what could still be the start of a preface or of
                // a marker.
                let keep = (PREFACE.len() - 1).min(self.buf.len());
                let mut drop = self.buf.len() - keep;
                if let Some(p) = partial {
                    drop = drop.min(p);
                }
                self.discarded += drop;
                self.buf.drain(..drop);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize, ty: u8) -> Vec<u8> {
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            ty,
            0,
            0,
            0,
            0,
            1,
        ];
        f.extend(std::iter::repeat_n(b'P', len));
        f
    }

    #[test]
    fn tracks_frames_and_ignores_payload_contents() {
        let mut t = FrameTracker::new(1 << 20);
        let mut s = PREFACE.to_vec();
        s.extend(frame(0, 4));
        s.extend(frame(100, 0));
        // A DATA frame whose payload is itself a preface is not a boundary.
        let mut data = vec![0, 0, PREFACE.len() as u8, 0, 0, 0, 0, 0, 1];
        data.extend_from_slice(PREFACE);
        s.extend(data);
        s.extend(frame(70_000, 0));
        assert_eq!(t.feed(&s), None);
        assert!(!t.goaway);
        // Byte by byte gives the same answer.
        let mut t = FrameTracker::new(1 << 20);
        for b in &s {
            assert_eq!(t.feed(std::slice::from_ref(b)), None);
        }
    }

    #[test]
    fn goaway_is_noticed() {
        let mut t = FrameTracker::new(1 << 20);
        let mut s = PREFACE.to_vec();
        s.extend(frame(8, 6));
        assert_eq!(t.feed(&s), None);
        assert!(!t.goaway);
        assert_eq!(t.feed(&frame(8, 7)[..4]), None);
        assert!(t.goaway);
    }

    #[test]
    fn new_preface_at_a_boundary_is_found() {
        let mut t = FrameTracker::new(1 << 20);
        let mut s = PREFACE.to_vec();
        s.extend(frame(8, 6));
        let at = s.len();
        s.extend_from_slice(PREFACE);
        assert_eq!(t.feed(&s), Some(at));
    }

    #[test]
    fn preface_split_across_chunks() {
        let mut p = PrefaceScanner::default();
        assert_eq!(p.push(b"stale junk PRI * HTTP"), None);
        let Some(Found::Preface(rest)) = p.push(b"/2.0\r\n\r\nSM\r\n\r\nSETTINGS") else {
            panic!("no preface found")
        };
        assert_eq!(&rest[..PREFACE.len()], PREFACE);
        assert_eq!(&rest[PREFACE.len()..], b"SETTINGS");
        assert_eq!(p.discarded, b"stale junk ".len());
    }

    #[test]
    fn sync_marker_split_across_chunks_then_preface() {
        let marker = somna_proto::serial_sync::marker(0xfeed);
        let mut p = PrefaceScanner::default();
        let mut input = b"old bytes".to_vec();
        input.extend_from_slice(&marker[..5]);
        assert_eq!(p.push(&input), None);
        let mut second = marker[5..].to_vec();
        second.extend_from_slice(PREFACE);
        let Some(Found::Sync { marker: m, rest }) = p.push(&second) else {
            panic!("no marker found")
        };
        assert_eq!(m, marker);
        assert_eq!(p.discarded, b"old bytes".len());
        let Some(Found::Preface(start)) = p.push(&rest) else {
            panic!("no preface after the marker")
        };
        assert_eq!(start, PREFACE);
        // Something that only looks like a marker is not one.
        let mut q = PrefaceScanner::default();
        assert_eq!(q.push(b"SOMNA-SYNC not-hex-at-all!!\n"), None);
    }
}
