//! The token users document of the admin API.

use crate::domain::report::UserRecord;
use crate::runtime::context::Context;

/// `GET /v1/tokens/{name}/users[?clientUserId=…]`: the token's users as
/// vppd last learned them (Get Users, USER_MANAGEMENT, USER_ASSOCIATED):
/// `{"users": [{"clientUserId", "email", "inviteCode", "idHash", "status"}]}`,
/// only the one named when `clientUserId` is given (none if unknown).
pub async fn document(
    ctx: &Context,
    token: &str,
    query: &[(String, String)],
) -> hyper::Response<crate::runtime::http::Body> {
    use hyper::StatusCode;
    let fail = |status: StatusCode, message: String| {
        crate::runtime::http::json(status, &serde_json::json!({ "error": message }))
    };
    if !ctx.tokens.contains(token)
        && let Err(e) = crate::runtime::token_sync::sync(ctx).await
    {
        return fail(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    if !ctx.tokens.contains(token) {
        return fail(StatusCode::NOT_FOUND, format!("no token `{token}`"));
    }
    let wanted = query
        .iter()
        .find(|(k, _)| k == "clientUserId")
        .map(|(_, v)| v.as_str());
    let users = match wanted {
        Some("") => {
            return fail(
                StatusCode::BAD_REQUEST,
                "clientUserId: must not be empty".into(),
            );
        }
        Some(id) => ctx
            .store
            .user(token, id)
            .await
            .map(|u| u.into_iter().collect()),
        None => ctx.store.users(token).await,
    };
    match users {
        Ok(users) => crate::runtime::http::json(
            StatusCode::OK,
            &serde_json::json!({ "users": users as Vec<UserRecord> }),
        ),
        Err(e) => fail(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
