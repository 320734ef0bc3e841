//! A reader for the one shape that nearly every notification of a rollout
//! has: an ASSET_MANAGEMENT notification whose strings hold no escapes and
//! which carries no error object.
//!
//! Reading those through serde was the largest single cost of receiving a
//! notification (a tenth of the daemon's CPU in a 100,000-device run):
//! serde's derived visitors walk every assignment's fields through several
//! layers of generic calls. This reader walks the bytes once, borrows every
//! string, and gives the notification in the form the listener stores.
//!
//! It answers `None` for anything it is not sure of (an escape or a control
//! character in a string, an error object, a number that is not a plain
//! integer, a field given twice, a required field missing, a value of an
//! unexpected type, anything after the object, nesting past a bound);
//! [`super::report::receive_notification`] then reads the body with serde
//! as before, which accepts or words the refusal. So what this accepts,
//! serde accepts too and reads the same way (a property test holds it to
//! that), and everything else is read as it always was.

use crate::domain::inbox::{AssignmentRef, StoredBody, StoredNotification};
use crate::domain::job::Target;

use super::types::{STDQ, event_type, notification_type, result};

/// The message stored for a failure Apple reports without an error, as
/// the serde reader stores it.
pub(super) const FAILURE_WITHOUT_ERROR: &str = "Apple reported a failure without an error";

/// Nesting allowed in a field vppd does not read before handing the body
/// to serde (whose own bound is 128).
const MAX_DEPTH: u32 = 32;

/// An ASSET_MANAGEMENT notification, read; `None` when the body is
/// anything else or anything this reader does not take (see the module).
pub fn asset_management(text: &str) -> Option<StoredNotification<'_>> {
    let mut s = Scan {
        text,
        bytes: text.as_bytes(),
        at: 0,
    };
    let mut id = None;
    let mut kind = None;
    let mut uid = None;
    let mut payload = None;
    s.object(|s, key| match key {
        "notificationId" => once(&mut id, s.string()?),
        "notificationType" => once(&mut kind, s.string()?),
        "uId" => once(&mut uid, s.string()?),
        "notification" => once(&mut payload, s.payload()?),
        _ => s.skip(0),
    })?;
    s.space();
    if s.at != s.bytes.len() {
        return None;
    }
    let (id, kind) = (id?, kind?);
    if kind != notification_type::ASSET_MANAGEMENT || id.trim().is_empty() {
        return None;
    }
    let p = payload?;
    let error = (p.result? != result::SUCCESS).then_some((0, FAILURE_WITHOUT_ERROR));
    Some(StoredNotification {
        id,
        kind,
        uid: uid.unwrap_or(""),
        body: StoredBody::Assets {
            event_id: p.event_id?,
            error,
            assignments: p.assignments.unwrap_or_default(),
            removal: p.kind? != event_type::ASSOCIATE,
        },
    })
}

/// A field seen twice is refused by serde's derived reader.
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

#[derive(Default)]
struct Payload<'a> {
    event_id: Option<&'a str>,
    kind: Option<&'a str>,
    result: Option<&'a str>,
    assignments: Option<Vec<AssignmentRef<'a>>>,
    error: Option<()>,
}

struct Scan<'a> {
    text: &'a str,
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn space(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    /// The next byte that is not white space, not consumed.
    fn peek(&mut self) -> Option<u8> {
        self.space();
        self.bytes.get(self.at).copied()
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        if self.peek()? != byte {
            return None;
        }
        self.at += 1;
        Some(())
    }

    fn literal(&mut self, word: &str) -> Option<()> {
        self.space();
        let end = self.at + word.len();
        if self.bytes.get(self.at..end)? != word.as_bytes() {
            return None;
        }
        self.at = end;
        Some(())
    }

    /// A string without escapes or control characters, borrowed.
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.at;
        let end = start + crate::domain::json::plain_len(&self.bytes[start..]);
        if self.bytes.get(end) != Some(&b'"') {
            return None;
        }
        self.at = end + 1;
        // Both ends are ASCII quotes, so this is a char boundary.
        self.text.get(start..end)
    }

    /// A string, or `null` for none.
    fn string_or_null(&mut self) -> Option<Option<&'a str>> {
        if self.peek()? == b'n' {
            self.literal("null")?;
            return Some(None);
        }
        self.string().map(Some)
    }

    /// An object, calling `field` with each key to read its value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a str) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.at += 1;
            return Some(());
        }
        loop {
            let key = self.string()?;
            self.eat(b':')?;
            field(self, key)?;
            match self.peek()? {
                b',' => self.at += 1,
                b'}' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An array, calling `item` for each element.
    fn array(&mut self, mut item: impl FnMut(&mut Self) -> Option<()>) -> Option<()> {
        self.eat(b'[')?;
        if self.peek()? == b']' {
            self.at += 1;
            return Some(());
        }
        loop {
            item(self)?;
            match self.peek()? {
                b',' => self.at += 1,
                b']' => {
                    self.at += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A value of a field vppd does not read: strings, plain integers,
    /// literals, and arrays and objects of them.
    fn skip(&mut self, depth: u32) -> Option<()> {
        if depth > MAX_DEPTH {
            return None;
        }
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' => self.object(|s, _| s.skip(depth + 1)),
            b'[' => self.array(|s| s.skip(depth + 1)),
            b't' => self.literal("true"),
            b'f' => self.literal("false"),
            b'n' => self.literal("null"),
            b'-' | b'0'..=b'9' => self.integer(),
            _ => None,
        }
    }

    /// `-?(0|[1-9][0-9]*)`, and no fraction or exponent after it.
    fn integer(&mut self) -> Option<()> {
        if self.bytes.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        match self.bytes.get(self.at)? {
            b'0' => self.at += 1,
            b'1'..=b'9' => {
                while let Some(b'0'..=b'9') = self.bytes.get(self.at) {
                    self.at += 1;
                }
            }
            _ => return None,
        }
        match self.bytes.get(self.at) {
            Some(b'.' | b'e' | b'E' | b'0'..=b'9') => None,
            _ => Some(()),
        }
    }

    fn payload(&mut self) -> Option<Payload<'a>> {
        let mut p = Payload::default();
        self.object(|s, key| match key {
            "eventId" => once(&mut p.event_id, s.string()?),
            "type" => once(&mut p.kind, s.string()?),
            "result" => once(&mut p.result, s.string()?),
            "assignments" => {
                // About 60 bytes an assignment; Apple sends at most 100.
                let hint = (s.bytes.len() - s.at) / 56;
                let mut list = Vec::with_capacity(hint.min(1024));
                s.array(|s| {
                    if let Some(a) = s.assignment()? {
                        list.push(a);
                    }
                    Some(())
                })?;
                once(&mut p.assignments, list)
            }
            // A failure with its error is rare: serde reads it.
            "error" => {
                s.literal("null")?;
                once(&mut p.error, ())
            }
            _ => s.skip(0),
        })?;
        Some(p)
    }

    /// An assignment; `Some(None)` for one that names no target, which the
    /// listener leaves out as the serde reader does.
    fn assignment(&mut self) -> Option<Option<AssignmentRef<'a>>> {
        let mut adam_id = None;
        let mut pricing = None;
        let mut user = None;
        let mut serial = None;
        let mut status = None;
        let mut hash = None;
        self.object(|s, key| match key {
            "adamId" => once(&mut adam_id, s.string()?),
            "pricingParam" => once(&mut pricing, s.string()?),
            "serialNumber" => once(&mut serial, s.string_or_null()?),
            "clientUserId" => once(&mut user, s.string_or_null()?),
            "userStatus" => once(&mut status, s.string_or_null()?),
            "idHash" => once(&mut hash, s.string_or_null()?),
            _ => s.skip(0),
        })?;
        let adam_id = adam_id?;
        let target = match (serial.flatten(), user.flatten()) {
            (Some(s), _) => Target::Serial(s),
            (None, Some(u)) => Target::User(u),
            (None, None) => return Some(None),
        };
        Some(Some(AssignmentRef {
            adam_id,
            pricing_param: pricing.unwrap_or(STDQ),
            target,
        }))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::apple::report::read_with_serde;
    use crate::domain::inbox;

    /// JSON as text, built so that anything can be put where a value goes:
    /// strings are kept as their literal (escapes included).
    #[derive(Debug, Clone)]
    enum J {
        Raw(String),
        Obj(Vec<(String, J)>),
        Arr(Vec<J>),
    }

    fn lit(s: &str) -> J {
        J::Raw(format!("\"{s}\""))
    }

    /// Writes `j`, with the white space from `ws` (cycled) between tokens.
    fn write(j: &J, ws: &[&str], at: &mut usize, out: &mut String) {
        fn space(ws: &[&str], at: &mut usize, out: &mut String) {
            if !ws.is_empty() {
                out.push_str(ws[*at % ws.len()]);
                *at += 1;
            }
        }
        match j {
            J::Raw(r) => out.push_str(r),
            J::Obj(fields) => {
                out.push('{');
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    space(ws, at, out);
                    out.push_str(&format!("\"{k}\""));
                    space(ws, at, out);
                    out.push(':');
                    space(ws, at, out);
                    write(v, ws, at, out);
                    space(ws, at, out);
                }
                out.push('}');
            }
            J::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    space(ws, at, out);
                    write(v, ws, at, out);
                    space(ws, at, out);
                }
                out.push(']');
            }
        }
    }

    /// String contents: mostly plain, sometimes what only serde reads.
    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            60 => "[A-Za-z0-9-]{0,12}",
            1 => Just(" ".to_string()),
            1 => Just("\\u0041b".to_string()),
            1 => Just("a\\\"b".to_string()),
            1 => Just("é✓".to_string()),
            1 => Just("a\u{1}b".to_string()),
            1 => Just("a\\qb".to_string()),
            1 => Just("0123456789\\\"ab".to_string()),
            1 => Just("01234567\u{1f}".to_string()),
            1 => Just("0123456é✓89abcdef".to_string()),
        ]
    }

    /// A value of a field vppd does not read, valid JSON or not.
    fn other() -> impl Strategy<Value = J> {
        let leaf = prop_oneof![
            4 => text().prop_map(|t| lit(&t)),
            4 => prop::sample::select(vec!["0", "-0", "17", "-42", "true", "false", "null", "[]", "{}"])
                .prop_map(|r| J::Raw(r.to_string())),
            1 => prop::sample::select(vec![
                "01", "1.5", "1e3", "-", "nul", "tru", "[1,]", "{\"a\":1,}", "\"x\"y", "NaN",
            ])
            .prop_map(|r| J::Raw(r.to_string())),
        ];
        leaf.prop_recursive(3, 12, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(J::Arr),
                prop::collection::vec(("[a-z]{1,3}", inner), 0..3).prop_map(J::Obj),
            ]
        })
    }

    /// A field: absent, given once (maybe as an odd value), or twice.
    fn field(
        key: &'static str,
        value: impl Strategy<Value = J> + 'static,
    ) -> impl Strategy<Value = Vec<(String, J)>> {
        let value = value.boxed();
        prop_oneof![
            1 => Just(vec![]),
            80 => value.clone().prop_map(move |v| vec![(key.to_string(), v)]),
            1 => other().prop_map(move |v| vec![(key.to_string(), v)]),
            1 => (value.clone(), value).prop_map(move |(a, b)| {
                vec![(key.to_string(), a), (key.to_string(), b)]
            }),
        ]
    }

    fn string_of(choices: Vec<&'static str>) -> impl Strategy<Value = J> + Clone {
        prop_oneof![
            20 => prop::sample::select(choices).prop_map(lit),
            1 => text().prop_map(|t| lit(&t)),
        ]
    }

    fn optional_string() -> impl Strategy<Value = J> + Clone {
        prop_oneof![
            12 => "[A-Z0-9]{1,8}".prop_map(|t| lit(&t)),
            4 => Just(J::Raw("null".into())),
            1 => text().prop_map(|t| lit(&t)),
        ]
    }

    /// Fields in any order, with unknown ones mixed in.
    fn object(parts: Vec<BoxedStrategy<Vec<(String, J)>>>) -> impl Strategy<Value = J> {
        let extra = prop_oneof![
            6 => Just(vec![]),
            1 => prop::collection::vec(("[a-zA-Z]{1,6}", other()), 1..3),
        ];
        (parts, extra, any::<prop::sample::Index>(), any::<u64>()).prop_map(
            |(parts, extra, _, seed)| {
                let mut fields: Vec<(String, J)> = parts.into_iter().flatten().collect();
                fields.extend(extra);
                // A fixed shuffle from the seed: proptest shrinks the seed.
                let mut state = seed;
                for i in (1..fields.len()).rev() {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    fields.swap(i, (state >> 33) as usize % (i + 1));
                }
                J::Obj(fields)
            },
        )
    }

    fn assignment() -> impl Strategy<Value = J> {
        object(vec![
            field("adamId", string_of(vec!["1", "408709785"])).boxed(),
            field("pricingParam", string_of(vec!["STDQ", "PLUS"])).boxed(),
            field("serialNumber", optional_string()).boxed(),
            field("clientUserId", optional_string()).boxed(),
            field("userStatus", optional_string()).boxed(),
            field("idHash", optional_string()).boxed(),
        ])
    }

    fn notification() -> impl Strategy<Value = J> {
        let error = prop_oneof![
            Just(J::Raw("null".into())),
            Just(J::Raw(
                r#"{"errorNumber":9709,"errorMessage":"short"}"#.into()
            )),
        ];
        let payload = object(vec![
            field("eventId", string_of(vec!["e-1", "87cbc650"])).boxed(),
            field(
                "type",
                string_of(vec!["ASSOCIATE", "DISASSOCIATE", "REVOKE"]),
            )
            .boxed(),
            field("result", string_of(vec!["SUCCESS", "FAILURE"])).boxed(),
            field(
                "assignments",
                prop::collection::vec(assignment(), 0..6).prop_map(J::Arr),
            )
            .boxed(),
            prop_oneof![3 => Just(vec![]), 1 => error.prop_map(|e| vec![("error".into(), e)])]
                .boxed(),
        ]);
        object(vec![
            field("notificationId", string_of(vec!["n-1", "ba8bbb23", ""])).boxed(),
            field(
                "notificationType",
                string_of(vec!["ASSET_MANAGEMENT", "ASSET_MANAGEMENT", "ASSET_COUNT"]),
            )
            .boxed(),
            field("uId", string_of(vec!["2049025000431439"])).boxed(),
            field("notification", payload).boxed(),
        ])
    }

    fn white_space() -> impl Strategy<Value = Vec<&'static str>> {
        prop::collection::vec(
            prop_oneof![
                40 => prop::sample::select(vec!["", " ", "\n", "\t", "\r\n  "]),
                1 => Just("\u{a0}"),
                1 => Just("\u{b}"),
            ],
            0..4,
        )
    }

    fn render(j: &J, ws: &[&str], tail: &str) -> String {
        let mut out = String::new();
        let mut at = 0;
        write(j, ws, &mut at, &mut out);
        out.push_str(tail);
        out
    }

    /// What the scanner reads, serde reads the same way.
    fn agrees(body: &str) -> Option<()> {
        let scanned = asset_management(body)?;
        let read = read_with_serde(body.as_bytes())
            .unwrap_or_else(|e| panic!("serde refuses what the scanner read ({e}): {body}"));
        assert_eq!(
            (scanned.id, scanned.kind, scanned.uid),
            (read.id(), read.kind(), read.uid()),
            "{body}"
        );
        assert_eq!(
            inbox::encode_borrowed(&scanned),
            read.stored().into_owned(),
            "{body}"
        );
        Some(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Anything the scanner reads is what serde reads from it.
        #[test]
        fn the_scanner_reads_only_what_serde_reads_and_reads_it_the_same(
            j in notification(),
            ws in white_space(),
            tail in prop_oneof![
                12 => prop::sample::select(vec!["", " \n"]),
                1 => prop::sample::select(vec!["x", "}", ",", "\u{0}"]),
            ],
        ) {
            let _ = agrees(&render(&j, &ws, tail));
        }

        /// A notification as Apple sends it is read by the scanner: in
        /// any field order, with unknown fields and any white space.
        #[test]
        fn the_scanner_reads_what_apple_sends(
            serials in prop::collection::vec(proptest::option::of("[A-Z0-9]{1,12}"), 0..100),
            removal in any::<bool>(),
            failed in any::<bool>(),
            ws in prop::collection::vec(prop::sample::select(vec!["", " ", "\n  ", "\t"]), 0..3),
            extra in any::<bool>(),
        ) {
            let items: Vec<J> = serials
                .iter()
                .map(|s| {
                    let mut f = vec![("adamId".to_string(), lit("408709785"))];
                    match s {
                        Some(s) => f.push(("serialNumber".into(), lit(s))),
                        None => f.push(("clientUserId".into(), lit("client-1"))),
                    }
                    f.push(("pricingParam".into(), lit("STDQ")));
                    J::Obj(f)
                })
                .collect();
            let mut payload = vec![
                ("assignments".to_string(), J::Arr(items)),
                ("eventId".to_string(), lit("87cbc650-16cc")),
                ("result".to_string(), lit(if failed { "FAILURE" } else { "SUCCESS" })),
                ("type".to_string(), lit(if removal { "DISASSOCIATE" } else { "ASSOCIATE" })),
            ];
            if extra {
                payload.push(("versionId".into(), J::Raw("[1, {\"a\": null}, true]".into())));
            }
            let j = J::Obj(vec![
                ("notification".into(), J::Obj(payload)),
                ("notificationId".into(), lit("ba8bbb23")),
                ("notificationType".into(), lit("ASSET_MANAGEMENT")),
                ("uId".into(), lit("2049025000431439")),
            ]);
            let body = render(&j, &ws, "");
            prop_assert!(agrees(&body).is_some(), "not read by the scanner: {}", body);
        }
    }

    #[test]
    fn what_the_scanner_leaves_to_serde() {
        let ok = r#"{"notificationId":"n","notificationType":"ASSET_MANAGEMENT","uId":"7","notification":{"eventId":"e","type":"ASSOCIATE","result":"SUCCESS","assignments":[{"adamId":"1","serialNumber":"S"}]}}"#;
        assert!(agrees(ok).is_some());
        for (from, to) in [
            // an escape
            ("\"S\"", "\"\\u0053\""),
            // an error object
            (
                "\"result\"",
                "\"error\":{\"errorNumber\":1,\"errorMessage\":\"m\"},\"result\"",
            ),
            // another type
            ("ASSET_MANAGEMENT", "ASSET_COUNT"),
            // a blank id
            ("\"n\"", "\" \""),
            // a field twice
            ("\"uId\":\"7\"", "\"uId\":\"7\",\"uId\":\"8\""),
            // a fraction
            ("\"uId\":\"7\"", "\"uId\":\"7\",\"t\":1.5"),
            // a missing adamId
            ("\"adamId\":\"1\",", ""),
            // assignments as null
            ("[{\"adamId\":\"1\",\"serialNumber\":\"S\"}]", "null"),
        ] {
            let body = ok.replacen(from, to, 1);
            assert_ne!(body, ok);
            assert!(asset_management(&body).is_none(), "{body}");
        }
        assert!(asset_management(&format!("{ok} x")).is_none());
        assert!(asset_management(&format!("{ok}\n")).is_some());
    }
}
