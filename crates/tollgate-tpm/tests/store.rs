//! Budgets kept in a shared store: reserve there, settle there with the real usage, and
//! follow the stated policy when it fails. A store in memory stands in for Redis here;
//! tollgate-redis tests the real one.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{chat, drain, fake_provider};
use tollgate_core::key::Key;
use tollgate_core::refusal::{Reason, Refusal};
use tollgate_core::store::{
    OnStoreFailure, StoreError, StoreFuture, TokenCell, TokenDecision, TokenStore,
};
use tollgate_tpm::{Budget, TokenQuota, TpmLayer};
use tower::{Layer, ServiceExt};

/// The cells and amount of one reservation.
type Reservation = (Vec<TokenCell>, u64);

#[derive(Clone, Default)]
struct Scripted {
    fail: Arc<AtomicBool>,
    deny: Arc<Mutex<Option<TokenDecision>>>,
    reserved: Arc<Mutex<Vec<Reservation>>>,
    settled: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl TokenStore for Scripted {
    fn reserve(
        &self,
        cells: Arc<[TokenCell]>,
        amount: u64,
    ) -> StoreFuture<Result<TokenDecision, StoreError>> {
        let answer = if self.fail.load(Ordering::SeqCst) {
            Err(StoreError::new("timed out"))
        } else if let Some(d) = self.deny.lock().unwrap().take() {
            Ok(d)
        } else {
            self.reserved.lock().unwrap().push((cells.to_vec(), amount));
            Ok(TokenDecision::Reserved { hold: 7 })
        };
        Box::pin(std::future::ready(answer))
    }

    fn settle(
        &self,
        _: Arc<[TokenCell]>,
        hold: u64,
        reserved: u64,
        used: u64,
    ) -> StoreFuture<Result<(), StoreError>> {
        assert_eq!(hold, 7, "the hold the store named");
        self.settled.lock().unwrap().push((reserved, used));
        Box::pin(std::future::ready(Ok(())))
    }
}

fn budget() -> Budget {
    Budget::new("tpm", TokenQuota::per_minute(4000))
}

/// A scripted store and the budget kept in it, failing closed.
fn stored() -> (Scripted, TpmLayer) {
    let store = Scripted::default();
    let layer = TpmLayer::builder()
        .budget(budget())
        .store(store.clone(), OnStoreFailure::Closed)
        .build();
    (store, layer)
}

#[tokio::test(start_paused = true)]
async fn reserves_and_settles_in_the_store_with_the_real_usage() {
    let (store, layer) = stored();
    let svc = layer.layer(fake_provider());
    drain(svc.oneshot(chat(10, 200, 57)).await.unwrap().into_body());
    tokio::task::yield_now().await;
    let (cells, amount) = store.reserved.lock().unwrap()[0].clone();
    assert_eq!(cells[0].key.as_str(), "tpm:global");
    assert_eq!(
        (cells[0].capacity, cells[0].window),
        (4000, Duration::from_secs(60))
    );
    assert_eq!(store.settled.lock().unwrap().as_slice(), &[(amount, 57)]);
    // The in-process ledger was not touched.
    assert!(matches!(
        layer.available("tpm", &Key::global()),
        None | Some(4000)
    ));
}

#[tokio::test(start_paused = true)]
async fn the_stores_refusals_are_refusals() {
    let (store, layer) = stored();
    let svc = layer.layer(fake_provider());
    *store.deny.lock().unwrap() = Some(TokenDecision::Denied {
        binding: 0,
        retry_after: None,
    });
    let r = *svc
        .clone()
        .oneshot(chat(10, 200, 0))
        .await
        .unwrap_err()
        .downcast::<Refusal>()
        .unwrap();
    assert_eq!(r.reason(), Reason::TooLarge);
    *store.deny.lock().unwrap() = Some(TokenDecision::Denied {
        binding: 0,
        retry_after: Some(Duration::from_secs(3)),
    });
    let r = *svc
        .oneshot(chat(10, 200, 0))
        .await
        .unwrap_err()
        .downcast::<Refusal>()
        .unwrap();
    assert_eq!(
        (r.reason(), r.retry_after()),
        (Reason::OverLimit, Some(Duration::from_secs(3)))
    );
}

#[tokio::test(start_paused = true)]
async fn failing_closed_refuses_and_failing_open_spends_the_local_share() {
    let store = Scripted::default();
    store.fail.store(true, Ordering::SeqCst);
    let closed = TpmLayer::builder()
        .budget(budget())
        .store(store.clone(), OnStoreFailure::Closed)
        .build();
    let err = closed
        .layer(fake_provider())
        .oneshot(chat(10, 200, 0))
        .await
        .unwrap_err();
    assert!(err.downcast_ref::<StoreError>().is_some(), "{err}");

    let open = TpmLayer::builder()
        .budget(budget())
        .store(store.clone(), OnStoreFailure::Open { instances: 4 })
        .build();
    let svc = open.layer(fake_provider());
    drain(
        svc.clone()
            .oneshot(chat(10, 200, 100))
            .await
            .unwrap()
            .into_body(),
    );
    // A quarter of 4000, less the 100 used.
    assert_eq!(open.available("tpm", &Key::global()), Some(900));

    // The store is back half a second later: reservations go to it again.
    store.fail.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(600)).await;
    drain(svc.oneshot(chat(10, 200, 100)).await.unwrap().into_body());
    let reserved = store.reserved.lock().unwrap().clone();
    assert_eq!(reserved.len(), 1);
    assert_eq!(
        reserved[0].0[0].capacity, 4000,
        "the whole budget, not this instance's share"
    );
}
