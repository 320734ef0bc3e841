//! License counts as vppd last learned them, per token: read from Get
//! Assets (at registration, every 5 minutes with the limits, and by the
//! license check before a job's first request), moved by ASSET_COUNT
//! deltas and by vppd's own confirmed changes (in the store commit that
//! confirms them). Shared by the daemon, the submitter and the job API.

use crate::apple::types::{ResponseAsset, UNLIMITED_COUNT};
use crate::apple::{AppleError, Client};
use crate::domain::lifecycle::now_ms;
use crate::runtime::context::Context;
use crate::store::{LicenseRecord, StoreError};

/// The record of one asset as Get Assets gave it.
pub fn record_of(asset: &ResponseAsset, now: u64) -> LicenseRecord {
    LicenseRecord {
        assigned_count: asset.assigned_count as i64,
        available_count: asset.available_count as i64,
        total_count: asset.total_count as i64,
        read_ms: now,
        updated_ms: now,
        product_type: asset.product_type.clone(),
        // Apple's counts as read include every delta reported before.
        applied: Vec::new(),
    }
}

/// Whether fewer than 10% of an asset's licenses are free (none free
/// included). Unlimited assets never are.
pub fn is_low(r: &LicenseRecord) -> bool {
    if r.total_count >= UNLIMITED_COUNT as i64 || r.available_count >= UNLIMITED_COUNT as i64 {
        return false;
    }
    r.available_count * 10 < r.total_count || r.available_count <= 0
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error(transparent)]
    Apple(#[from] AppleError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Reads every asset of the token (Get Assets, all pages), stores their
/// counts and updates the low-licenses metric.
pub async fn refresh(ctx: &Context, token: &str, client: &Client) -> Result<usize, RefreshError> {
    let walk = client.get_assets(&Default::default()).await?;
    let now = now_ms();
    for asset in &walk.items {
        let record = record_of(asset, now);
        ctx.store
            .put_license(token, &asset.adam_id, &asset.pricing_param, &record)
            .await?;
    }
    update_low_metric(ctx, token).await?;
    Ok(walk.items.len())
}

/// Sets `vppd_license_assets_low{token}` from the stored counts.
pub async fn update_low_metric(ctx: &Context, token: &str) -> Result<(), StoreError> {
    let low = ctx
        .store
        .licenses(token)
        .await?
        .iter()
        .filter(|(_, _, r)| is_low(r))
        .count();
    ctx.metrics
        .license_assets_low
        .with_label_values(&[token])
        .set(low as i64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(total: i64, available: i64) -> LicenseRecord {
        LicenseRecord {
            total_count: total,
            available_count: available,
            assigned_count: total - available,
            ..Default::default()
        }
    }

    #[test]
    fn low_means_under_ten_percent_free() {
        assert!(is_low(&rec(100, 9)));
        assert!(!is_low(&rec(100, 10)));
        assert!(is_low(&rec(5, 0)));
        assert!(is_low(&rec(0, 0)));
        assert!(!is_low(&rec(
            UNLIMITED_COUNT as i64,
            UNLIMITED_COUNT as i64
        )));
    }
}
