//! JSON read from bytes, checked as UTF-8 in one pass first.
//!
//! serde_json's reader of bytes checks every string on its own as it goes,
//! which for the bodies vppd reads most (Apple's notifications and pages of
//! assignments, its own stored records) costs about what the parse does.
//! Checked once up front, the text is then read by the reader of `str`,
//! which checks nothing more. Bytes that are not UTF-8 are still read by
//! the reader of bytes, so an error says where, as it did.

use serde::Deserialize;

/// `serde_json::from_slice`, the same answers, cheaper on valid UTF-8.
pub fn from_bytes<'de, T: Deserialize<'de>>(bytes: &'de [u8]) -> serde_json::Result<T> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
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
}
