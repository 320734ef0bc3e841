//! The ids vppd passes between its layers, each its own type: a job id
//! handed where an eventId belongs does not compile. They are kept, sent
//! and logged exactly as the strings (or uuids) they wrap: serde sees
//! through them, so no stored record and no message changes shape.

use std::borrow::Borrow;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Defines an owned string id: transparent to serde, printed (also by
/// `Debug`) as the string it holds, borrowed as a `str` so that maps keyed
/// by it are read with a `&str`.
macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn new(id: impl Into<String>) -> $name {
                $name(id.into())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }

            pub fn is_empty(&self) -> bool {
                self.0.is_empty()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<String> for $name {
            fn from(id: String) -> $name {
                $name(id)
            }
        }

        impl From<&str> for $name {
            fn from(id: &str) -> $name {
                $name(id.to_string())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<$name> for str {
            fn eq(&self, other: &$name) -> bool {
                self == other.0
            }
        }

        impl PartialEq<$name> for &str {
            fn eq(&self, other: &$name) -> bool {
                *self == other.0
            }
        }
    };
}

string_id!(
    /// A job's id, as the job API names it (the client's, or a uuid vppd
    /// gave the job): the key of its record, spec, batches and failures.
    /// Checked once, where a job is read from the API
    /// ([`crate::domain::job::JobRequest::validate`]).
    JobId
);

string_id!(
    /// An eventId Apple answered a request with, which its notifications
    /// and status name: how they find their batch. Apple's string as it
    /// gave it; vppd never makes one up.
    EventId
);

/// The id of one command delivered to the MDM: a name-based uuid that is
/// the same on every retried delivery of the command, so that the MDM can
/// drop repeats ([`crate::domain::job::command_uuid_of`]). Written as
/// hyphenated lower-case, in JSON and by `Display` and `Debug` alike.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CommandUuid(uuid::Uuid);

impl CommandUuid {
    /// The length of its written form.
    pub const LENGTH: usize = uuid::fmt::Hyphenated::LENGTH;

    pub const fn from_uuid(uuid: uuid::Uuid) -> CommandUuid {
        CommandUuid(uuid)
    }

    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }

    /// Its written form in `buf`: a delivery writes millions of commands,
    /// each without an allocation of its own.
    pub fn encode<'b>(&self, buf: &'b mut [u8; Self::LENGTH]) -> &'b str {
        self.0.hyphenated().encode_lower(buf)
    }
}

impl From<uuid::Uuid> for CommandUuid {
    fn from(uuid: uuid::Uuid) -> CommandUuid {
        CommandUuid(uuid)
    }
}

impl fmt::Display for CommandUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; Self::LENGTH];
        f.write_str(self.encode(&mut buf))
    }
}

impl fmt::Debug for CommandUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for CommandUuid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; Self::LENGTH];
        s.serialize_str(self.encode(&mut buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_string_id_is_its_string_in_json_and_in_print() {
        let id = JobId::from("job-1");
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"job-1\"");
        assert_eq!(serde_json::from_str::<JobId>("\"job-1\"").unwrap(), id);
        assert_eq!(format!("{id:?}"), "\"job-1\"");
        assert_eq!(id.to_string(), "job-1");
        assert_eq!(format!("{id:>6}"), " job-1");
        let ev = EventId::new("e");
        assert_eq!(serde_json::to_vec(&Some(ev)).unwrap(), b"\"e\"");
    }

    #[test]
    fn a_map_keyed_by_id_is_read_with_a_str() {
        let mut map = std::collections::HashMap::new();
        map.insert(EventId::from("e1"), 1);
        assert_eq!(map.get("e1"), Some(&1));
    }

    #[test]
    fn a_command_uuid_is_written_hyphenated_lower_case() {
        let uuid = uuid::Uuid::from_u128(0xABCD_EF01_2345_6789_ABCD_EF01_2345_6789);
        let id = CommandUuid::from(uuid);
        let want = "abcdef01-2345-6789-abcd-ef0123456789";
        assert_eq!(id.to_string(), want);
        assert_eq!(format!("{id:?}"), want);
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{want}\""));
        assert_eq!(
            serde_json::to_string(&id).unwrap(),
            serde_json::to_string(&uuid.hyphenated()).unwrap()
        );
    }
}
