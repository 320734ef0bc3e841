//! JSON read from bytes, checked as UTF-8 in one pass first.
//!
//! serde_json's reader of bytes checks every string on its own as it goes,
//! which for the bodies vppd reads most (Apple's notifications and pages of
//! assignments, its own stored records) costs about what the parse does.
//! Checked once up front, the text is then read by the reader of `str`,
//! which checks nothing more. Bytes that are not UTF-8 are still read by
//! the reader of bytes, so an error says where, as it did.
//!
//! Also how far a string runs before it needs JSON escaping, eight bytes at
//! a time: vppd writes and reads millions of short plain strings in a
//! rollout (commands for the MDM, Apple's notifications).

use serde::Deserialize;

/// `serde_json::from_slice`, the same answers, cheaper on valid UTF-8.
pub fn from_bytes<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

/// The length of the longest prefix of `bytes` that a JSON string holds as
/// it is: up to the first quote, backslash or control character.
pub fn plain_len(bytes: &[u8]) -> usize {
    let mut end = 0;
    // Eight bytes at a time, then one at a time for the last few.
    while let Some(chunk) = bytes.get(end..end + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let found = stops(u64::from_le_bytes(word));
        if found != 0 {
            return end + (found.trailing_zeros() / 8) as usize;
        }
        end += 8;
    }
    while let Some(&b) = bytes.get(end) {
        if STOPS[b as usize] {
            break;
        }
        end += 1;
    }
    end
}

/// The bytes that end a string this reader takes: its closing quote, or
/// an escape or a control character, which it leaves to serde.
static STOPS: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t
};

/// The high bit of each byte of `word` that is a quote, a backslash or a
/// control character. The lowest one set is exact (a borrow only moves
/// upward, past a byte already found), which is the only one read.
fn stops(word: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGH;
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    control | zero(word ^ (ONES * b'"' as u64)) | zero(word ^ (ONES * b'\\' as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn same(bytes: &[u8]) {
        let fast = from_bytes::<serde_json::Value>(bytes).map_err(|e| e.to_string());
        let slow = serde_json::from_slice::<serde_json::Value>(bytes).map_err(|e| e.to_string());
        assert_eq!(fast, slow, "{}", String::from_utf8_lossy(bytes));
    }

    #[test]
    fn bad_bytes_are_refused_as_the_reader_of_bytes_words_it() {
        same(b"{\"a\":\"\xff\"}");
        same(b"{\"a\":\"\\ud800\"}");
        same(b"{\"a\":1,}");
        same(b"");
        let e = from_bytes::<serde_json::Value>(b"{\"a\":\"x\xc3\"}").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    proptest! {
        /// Any bytes, JSON or not, read the same either way.
        #[test]
        fn reads_as_from_slice(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            same(&bytes);
        }

        /// Valid JSON built from any strings (escapes, non-ASCII) too.
        #[test]
        fn reads_json_as_from_slice(keys in proptest::collection::vec(".{0,8}", 0..6), n in any::<i64>()) {
            let object: serde_json::Map<String, serde_json::Value> = keys
                .iter()
                .map(|k| (k.clone(), serde_json::json!([k, n, null, {"x": k}])))
                .collect();
            same(serde_json::to_string(&object).unwrap().as_bytes());
        }
    }
    proptest! {
        /// Eight bytes at a time, a string ends where one at a time would
        /// end it.
        #[test]
        fn stops_finds_the_first_stop_byte(
            word in prop::array::uniform8(prop_oneof![
                4 => any::<u8>(),
                1 => prop::sample::select(vec![b'"', b'\\', 0x1f, 0x20, 0x21, 0x5b, 0x5d, 0x7f, 0x80, 0]),
            ]),
        ) {
            let first = word.iter().position(|&b| STOPS[b as usize]);
            let found = stops(u64::from_le_bytes(word));
            let by_word = (found != 0).then(|| (found.trailing_zeros() / 8) as usize);
            prop_assert_eq!(by_word, first);
        }
    }

    proptest! {
        /// `plain_len` stops where a byte-by-byte look would.
        #[test]
        fn plain_len_stops_at_the_first_byte_to_escape(
            bytes in prop::collection::vec(prop_oneof![
                8 => 0x20u8..0x7f,
                1 => any::<u8>(),
                1 => prop::sample::select(vec![b'"', b'\\', 0x1f, 0x7f, 0x80, 0]),
            ], 0..40),
        ) {
            let first = bytes.iter().position(|&b| b < 0x20 || b == b'"' || b == b'\\');
            prop_assert_eq!(plain_len(&bytes), first.unwrap_or(bytes.len()));
        }
    }
}
