//! The admin API, `credbroker.admin.v1.Admin`: reload and flush, for the callers the kernel identifies as one
//! of `daemon.admins` (user names, and groups written `@group`). Everyone else gets `PERMISSION_DENIED`. Every
//! call, allowed or not, is an audit event (`event = "admin"`).

use std::sync::Arc;

use credbroker_proto::admin::{self as pb, admin_server::Admin};
use tonic::{Request, Response, Status};

use crate::Reloader;
use crate::audit;
use crate::identity::conn::Connection;
use crate::identity::peer::Caller;
use crate::serve::service::Broker;

/// The admin service.
#[derive(Clone)]
pub struct AdminService {
    broker: Arc<Broker>,
    reloader: Arc<Reloader>,
}

impl AdminService {
    /// The admin API over `broker`, reloading with `reloader`.
    pub fn new(broker: Arc<Broker>, reloader: Arc<Reloader>) -> Self {
        Self { broker, reloader }
    }

    /// The caller, if the kernel identifies it as an admin; audits the call either way.
    fn admin<T>(&self, call: &'static str, request: &Request<T>) -> Result<Arc<Caller>, Status> {
        let caller = request
            .extensions()
            .get::<Arc<Connection>>()
            .ok_or_else(|| Status::unauthenticated("not a Unix socket peer"))?
            .caller()
            .map_err(|e| Status::unauthenticated(format!("cannot identify the caller: {e}")))?;
        let allowed = self.broker.is_admin(&caller);
        audit::admin(&caller, call, allowed);
        if allowed {
            Ok(caller)
        } else {
            Err(Status::permission_denied(format!(
                "{caller} is not one of daemon.admins"
            )))
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn reload(
        &self,
        request: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        self.admin("reload", &request)?;
        let (reloader, broker) = (self.reloader.clone(), self.broker.clone());
        // Reading the config and secrets blocks: off the async workers.
        let outcome = tokio::task::spawn_blocking(move || reloader.reload(&broker))
            .await
            .map_err(|e| Status::internal(format!("reload failed: {e}")))?;
        match outcome {
            Ok(r) => Ok(Response::new(pb::ReloadResponse {
                summary: r.summary,
                clients_changed: r.changes.clients_changed,
                tokens_dropped: r.changes.tokens_dropped as u64,
                need_restart: r
                    .changes
                    .need_restart
                    .iter()
                    .map(|s| (*s).to_owned())
                    .collect(),
            })),
            Err(errors) => Err(Status::invalid_argument(format!(
                "config refused; still serving the previous one: {errors}"
            ))),
        }
    }

    async fn flush(
        &self,
        request: Request<pb::FlushRequest>,
    ) -> Result<Response<pb::FlushResponse>, Status> {
        self.admin("flush", &request)?;
        let r = request.into_inner();
        let dropped = self.broker.flush(&r.client, &r.scopes);
        Ok(Response::new(pb::FlushResponse {
            dropped: dropped as u64,
        }))
    }
}
