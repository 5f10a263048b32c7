//! Keeping tool output small enough for a model's context: the head and the
//! tail of long output, with a note that says what was left out.

/// `bytes` as text: whole when it fits in `limit` bytes, else the first and
/// last `limit / 2` bytes around a line that says how much was left out.
/// Invalid UTF-8 is replaced, and cuts never split a character.
pub fn head_tail(bytes: &[u8], limit: usize) -> (String, bool) {
    if bytes.len() <= limit {
        return (String::from_utf8_lossy(bytes).into_owned(), false);
    }
    let half = limit / 2;
    let head_end = char_boundary_before(bytes, half);
    let tail_start = char_boundary_after(bytes, bytes.len() - half);
    let omitted = tail_start - head_end;
    let text = format!(
        "{}\n[... {omitted} bytes omitted: the output was {} bytes; showing the first {head_end} and the last {} ...]\n{}",
        String::from_utf8_lossy(&bytes[..head_end]),
        bytes.len(),
        bytes.len() - tail_start,
        String::from_utf8_lossy(&bytes[tail_start..]),
    );
    (text, true)
}

/// The largest index <= `i` that does not cut a UTF-8 sequence (when the
/// bytes are UTF-8 at all).
fn char_boundary_before(bytes: &[u8], mut i: usize) -> usize {
    let floor = i.saturating_sub(3);
    while i > floor && i < bytes.len() && is_continuation(bytes[i]) {
        i -= 1;
    }
    i
}

/// The smallest index >= `i` that does not cut a UTF-8 sequence.
fn char_boundary_after(bytes: &[u8], mut i: usize) -> usize {
    let ceil = (i + 3).min(bytes.len());
    while i < ceil && is_continuation(bytes[i]) {
        i += 1;
    }
    i
}

fn is_continuation(b: u8) -> bool {
    b & 0b1100_0000 == 0b1000_0000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_output_is_whole() {
        assert_eq!(head_tail(b"42\n", 100), ("42\n".to_string(), false));
    }

    #[test]
    fn long_output_keeps_head_and_tail_with_a_note() {
        let data: Vec<u8> = (0..10_000).map(|i| b'a' + (i % 26) as u8).collect();
        let (text, truncated) = head_tail(&data, 1000);
        assert!(truncated);
        assert!(text.starts_with("abcde"));
        assert!(text.contains("[... 9000 bytes omitted: the output was 10000 bytes"));
        assert!(text.ends_with(std::str::from_utf8(&data[9500..]).unwrap()));
        assert!(text.len() < 1200);
    }

    #[test]
    fn cuts_do_not_split_characters() {
        let data = "é".repeat(1000); // 2 bytes each
        let (text, truncated) = head_tail(data.as_bytes(), 101);
        assert!(truncated);
        assert!(!text.contains('\u{fffd}'), "{text}");
    }
}
