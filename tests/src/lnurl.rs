//! A small LNURL-pay server (LUD-06/16) on loopback for payout tests.
//!
//! `alice@127.0.0.1:<port>` resolves to `http://127.0.0.1:<port>/.well-known/lnurlp/alice`. For
//! an ordinary user the callback creates a real mint quote at a second [`TestMint`] (the
//! recipient's mint), so a payout produces an invoice that mint issued and the test can see the
//! recipient side: [`LnurlServer::invoices`] and, by minting the quote, the recipient's balance.
//! Users registered with [`Behaviour::FailingMelt`] or [`Behaviour::PendingMelt`] get a fake
//! invoice whose description makes the paying mint's FakeWallet fail or hang the payment;
//! [`Behaviour::Unreachable`] answers every request with HTTP 503; [`Behaviour::Redirect`]
//! and [`Behaviour::Oversized`] play a hostile LNURL server.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cdk::nuts::PaymentMethod;
use cdk::Amount;
use serde_json::json;

use crate::mint::{failing_description, fake_invoice, pending_description, TestMint};

/// How a user's endpoint behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Real invoice from the recipient mint.
    Normal,
    /// Invoice whose payment fails at the paying mint.
    FailingMelt,
    /// Invoice whose payment stays pending at the paying mint.
    PendingMelt,
    /// HTTP 503 on every request.
    Unreachable,
    /// Pay parameters answered with `302 Location:` the well-known URL of the (normal) user
    /// `redirect-target` on this same loopback server: a client following redirects would
    /// pay it, bypassing its own check of the first host.
    Redirect,
    /// Valid pay parameters padded to 1 MiB: a client without a body cap reads it all.
    Oversized,
}

/// The user a [`Behaviour::Redirect`] user redirects to (register it as `Normal`).
pub const REDIRECT_TARGET: &str = "redirect-target";

/// An invoice the server handed out.
#[derive(Debug, Clone)]
pub struct IssuedInvoice {
    pub user: String,
    pub amount_sat: u64,
    pub bolt11: String,
    /// Mint-quote id at the recipient mint (`None` for fake invoices).
    pub quote_id: Option<String>,
}

struct Shared {
    addr: SocketAddr,
    users: Mutex<HashMap<String, Behaviour>>,
    issued: Mutex<Vec<IssuedInvoice>>,
    recipient: cdk::wallet::Wallet,
}

/// The server. Dropping it stops it.
pub struct LnurlServer {
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl LnurlServer {
    /// Start a server whose ordinary invoices come from `recipient_mint`.
    pub async fn start(recipient_mint: &TestMint) -> LnurlServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind lnurl server");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            addr,
            users: Mutex::new(HashMap::new()),
            issued: Mutex::new(Vec::new()),
            recipient: recipient_mint.new_wallet().await,
        });
        let router = Router::new()
            .route("/.well-known/lnurlp/{user}", get(pay_params))
            .route("/cb/{user}", get(callback))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        LnurlServer { shared, server }
    }

    /// Register `user` and return its Lightning address.
    pub fn add_user(&self, user: &str, behaviour: Behaviour) -> String {
        self.shared
            .users
            .lock()
            .expect("users")
            .insert(user.to_string(), behaviour);
        self.address(user)
    }

    /// Change how `user` behaves (e.g. make it reachable again).
    pub fn set_behaviour(&self, user: &str, behaviour: Behaviour) {
        self.add_user(user, behaviour);
    }

    /// `user@127.0.0.1:<port>`.
    pub fn address(&self, user: &str) -> String {
        format!("{user}@{}", self.shared.addr)
    }

    /// Every invoice handed out so far.
    pub fn invoices(&self) -> Vec<IssuedInvoice> {
        self.shared.issued.lock().expect("issued").clone()
    }

    /// Sum of invoice amounts issued to `user`.
    pub fn invoiced_to(&self, user: &str) -> u64 {
        self.invoices()
            .iter()
            .filter(|i| i.user == user)
            .map(|i| i.amount_sat)
            .sum()
    }

    /// The recipient-side wallet at the recipient mint (holds the mint quotes).
    pub fn recipient_wallet(&self) -> &cdk::wallet::Wallet {
        &self.shared.recipient
    }
}

impl Drop for LnurlServer {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn behaviour(shared: &Shared, user: &str) -> Option<Behaviour> {
    shared.users.lock().expect("users").get(user).copied()
}

async fn pay_params(State(shared): State<Arc<Shared>>, Path(user): Path<String>) -> Response {
    match behaviour(&shared, &user) {
        None => StatusCode::NOT_FOUND.into_response(),
        Some(Behaviour::Unreachable) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Some(Behaviour::Redirect) => (
            StatusCode::FOUND,
            [(
                axum::http::header::LOCATION,
                format!(
                    "http://{}/.well-known/lnurlp/{REDIRECT_TARGET}",
                    shared.addr
                ),
            )],
        )
            .into_response(),
        Some(Behaviour::Oversized) => Json(json!({
            "tag": "payRequest",
            "callback": format!("http://{}/cb/{user}", shared.addr),
            "minSendable": 1000,
            "maxSendable": 100_000_000_000u64,
            "metadata": "[[\"text/plain\",\"tollgate test\"]]",
            "padding": "x".repeat(1024 * 1024),
        }))
        .into_response(),
        Some(_) => Json(json!({
            "tag": "payRequest",
            "callback": format!("http://{}/cb/{user}", shared.addr),
            "minSendable": 1000,
            "maxSendable": 100_000_000_000u64,
            "metadata": "[[\"text/plain\",\"tollgate test\"]]",
        }))
        .into_response(),
    }
}

async fn callback(
    State(shared): State<Arc<Shared>>,
    Path(user): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let Some(msat) = q.get("amount").and_then(|a| a.parse::<u64>().ok()) else {
        return Json(json!({"status": "ERROR", "reason": "amount missing"})).into_response();
    };
    let (bolt11, quote_id) = match behaviour(&shared, &user) {
        None => return StatusCode::NOT_FOUND.into_response(),
        Some(Behaviour::Unreachable) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        Some(Behaviour::Redirect) => return StatusCode::NOT_FOUND.into_response(),
        Some(Behaviour::FailingMelt) => (fake_invoice(msat, &failing_description()), None),
        Some(Behaviour::PendingMelt) => (fake_invoice(msat, &pending_description()), None),
        Some(Behaviour::Normal | Behaviour::Oversized) => {
            match shared
                .recipient
                .mint_quote(
                    PaymentMethod::BOLT11,
                    Some(Amount::from(msat / 1000)),
                    None,
                    None,
                )
                .await
            {
                Ok(q) => (q.request.clone(), Some(q.id.clone())),
                Err(e) => {
                    return Json(json!({"status": "ERROR", "reason": e.to_string()}))
                        .into_response()
                }
            }
        }
    };
    shared.issued.lock().expect("issued").push(IssuedInvoice {
        user,
        amount_sat: msat / 1000,
        bolt11: bolt11.clone(),
        quote_id,
    });
    Json(json!({"pr": bolt11, "routes": []})).into_response()
}
