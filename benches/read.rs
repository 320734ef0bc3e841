//! Reading an ASSET_MANAGEMENT notification as Apple sends it (100
//! assignments, one asset, serials of 12 characters), the way the listener
//! reads every notification of a rollout: with the scanner
//! (`vppd::apple::scan`), and with serde alone as before it. Prints the
//! time per notification and per assignment of each, in this process, with
//! nothing else running: the part of the daemon's CPU this stage is.
//!
//! ```sh
//! cargo bench --bench read
//! ```

use std::hint::black_box;
use std::time::Instant;

use vppd::apple::report::{read_with_serde, receive_notification};

const ITEMS: usize = 100;
const ROUNDS: usize = 5_000;

fn notification(i: usize) -> Vec<u8> {
    let assignments: Vec<_> = (0..ITEMS)
        .map(|k| {
            serde_json::json!({
                "adamId": "408709785",
                "pricingParam": "STDQ",
                "serialNumber": format!("C02Y{:08}", i * ITEMS + k),
            })
        })
        .collect();
    let body = serde_json::json!({
        "notification": {
            "assignments": assignments,
            "eventId": format!("87cbc650-16cc-4f9e-a833-{:012}", i),
            "result": "SUCCESS",
            "type": "ASSOCIATE",
        },
        "notificationId": format!("ba8bbb23-44c2-44f6-a928-{:012}", i),
        "notificationType": "ASSET_MANAGEMENT",
        "uId": "2049025000431439",
    });
    serde_json::to_vec(&body).unwrap_or_default()
}

/// Seconds per notification: the fastest of `REPEATS` timings, taken in
/// turn with the other readers' so that a busy moment of a shared machine
/// does not land on one reader only.
fn time(bodies: &[Vec<u8>], read: &dyn Fn(&[u8]) -> usize) -> f64 {
    let mut total = 0;
    let started = Instant::now();
    for _ in 0..ROUNDS / bodies.len() {
        for b in bodies {
            total += read(black_box(b));
        }
    }
    black_box(total);
    started.elapsed().as_secs_f64() / ROUNDS as f64
}

const REPEATS: usize = 7;

fn main() {
    let bodies: Vec<Vec<u8>> = (0..100).map(notification).collect();
    // Both read the same thing, or the comparison means nothing.
    for b in &bodies {
        let scanned = receive_notification(b).map(|r| r.stored().into_owned());
        let serde = read_with_serde(b).map(|r| r.stored().into_owned());
        assert_eq!(scanned.ok(), serde.ok(), "the two readers differ");
    }
    type Reader = Box<dyn Fn(&[u8]) -> usize>;
    let readers: [(&str, Reader); 3] = [
        (
            "with serde",
            Box::new(|b| read_with_serde(b).map_or(0, |r| r.id().len())),
        ),
        (
            "with the scanner",
            Box::new(|b| receive_notification(b).map_or(0, |r| r.id().len())),
        ),
        (
            "with the scanner, then encoded as named",
            Box::new(|b| receive_notification(b).map_or(0, |r| r.stored().len())),
        ),
    ];
    let mut best = [f64::MAX; 3];
    for _ in 0..REPEATS {
        for (i, (_, read)) in readers.iter().enumerate() {
            best[i] = best[i].min(time(&bodies, read.as_ref()));
        }
    }
    for ((name, _), per) in readers.iter().zip(best) {
        println!(
            "read {name}: {:.1} µs per notification, {:.0} ns per assignment",
            per * 1e6,
            per * 1e9 / ITEMS as f64
        );
    }
    println!(
        "scanner: {:.1}x as fast as serde ({:.1}x with the encoding serde's path includes)",
        best[0] / best[1],
        best[0] / best[2]
    );
}
