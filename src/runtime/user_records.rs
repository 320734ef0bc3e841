//! What vppd knows of a token's users at Apple, shared by the submitter's
//! users step (which creates, updates and retires them) and the users
//! follower (which waits for them to link an Apple Account): Apple's
//! `status` values, the one record kept per `clientUserId`, and Get Users
//! reads stored as Apple answered them.

use std::collections::{HashMap, HashSet};

use crate::apple::client::UsersQuery;
use crate::apple::{AppleError, Client};
use crate::domain::report::UserRecord;
use crate::store::{Fold, Store, StoreError};

/// Why the work of a user stage (the submitter's users step, the held
/// installs' follower) stopped.
#[derive(Debug, thiserror::Error)]
pub enum UsersError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Apple(#[from] AppleError),
    #[error("shutting down")]
    Shutdown,
}

/// Apple's user `status` values.
pub mod status {
    pub const REGISTERED: &str = "Registered";
    pub const ASSOCIATED: &str = "Associated";
    pub const RETIRED: &str = "Retired";
    pub const DELETED: &str = "Deleted";
}

/// Up to this many users are synced one Get Users (by `clientUserId`) each;
/// more are read in one walk of the whole list.
const SYNC_ONE_BY_ONE: usize = 10;

/// Registered or associated: the user exists at Apple.
pub fn is_active(record: &UserRecord) -> bool {
    matches!(
        record.status.as_deref(),
        Some(status::REGISTERED | status::ASSOCIATED)
    )
}

/// Retired or deleted: the user is gone from Apple.
pub fn is_gone(record: &UserRecord) -> bool {
    matches!(
        record.status.as_deref(),
        Some(status::RETIRED | status::DELETED)
    )
}

/// Whether Apple reports the user `Associated` (linked to an Apple Account).
pub fn is_associated(record: &UserRecord) -> bool {
    record.status.as_deref() == Some(status::ASSOCIATED)
}

/// One record per `clientUserId`: Apple keeps the retired records of a user
/// created again beside its active one, and the active one is the user.
pub fn merge(records: impl IntoIterator<Item = UserRecord>) -> HashMap<String, UserRecord> {
    let mut out: HashMap<String, UserRecord> = HashMap::new();
    for r in records {
        match out.get(&r.client_user_id) {
            Some(have) if is_active(have) && !is_active(&r) => {}
            _ => {
                out.insert(r.client_user_id.clone(), r);
            }
        }
    }
    out
}

/// Reads users from Apple: by `clientUserId` when few, else the whole list.
pub async fn read_users(client: &Client, ids: &[String]) -> Result<Vec<UserRecord>, AppleError> {
    let mut out = Vec::new();
    if ids.len() <= SYNC_ONE_BY_ONE {
        for id in ids {
            let walk = client
                .get_users(&UsersQuery {
                    client_user_id: Some(id.clone()),
                    ..Default::default()
                })
                .await?;
            out.extend(walk.items.into_iter().map(UserRecord::from));
        }
    } else {
        let walk = client.get_users(&UsersQuery::default()).await?;
        let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
        out.extend(
            walk.items
                .into_iter()
                .filter(|u| wanted.contains(u.client_user_id.as_str()))
                .map(UserRecord::from),
        );
    }
    Ok(out)
}

/// Stores users of `token` as Apple reported them (one commit).
pub async fn store_users(
    store: &dyn Store,
    token: &str,
    users: HashMap<String, UserRecord>,
) -> Result<(), StoreError> {
    if users.is_empty() {
        return Ok(());
    }
    store
        .fold(Fold {
            users: users
                .into_values()
                .map(|u| (token.to_string(), u))
                .collect(),
            ..Fold::default()
        })
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: &str, status: &str) -> UserRecord {
        UserRecord::with_status(id, status)
    }

    #[test]
    fn the_active_record_wins() {
        let merged = merge([
            user("a", status::RETIRED),
            user("a", status::REGISTERED),
            user("a", status::RETIRED),
            user("b", status::RETIRED),
        ]);
        assert_eq!(merged["a"].status.as_deref(), Some(status::REGISTERED));
        assert_eq!(merged["b"].status.as_deref(), Some(status::RETIRED));
    }
}
