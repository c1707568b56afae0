//! What the console's forms do: send a directive, cancel one, revoke a
//! spoke, rotate its key, delete it. Each POST must come from a session
//! with the session's form token (or with the admin token in a header);
//! destructive ones ask to be confirmed first (a page with the same form
//! and `confirm=yes`: works without JavaScript). Each calls the same
//! `AdminService` method the CLI calls over gRPC and answers with its
//! error, as the CLI prints it (`CODE: message`).

use std::net::SocketAddr;

use axum::Form;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use hub_proto::v1 as proto;
use hub_proto::v1::admin_service_server::AdminService;
use tonic::{Code, Status};

use super::layout::{encode, escape, form_open, frame};
use super::{Viewer, authorize};
use crate::api::Hub;
use crate::api::admin::AdminApi;
use crate::wire::timestamp_ms;

/// A form's fields (each action reads the ones it has).
#[derive(Debug, Default, serde::Deserialize)]
pub struct Fields {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    confirm: String,
    #[serde(default, rename = "type")]
    kind: String,
    #[serde(default)]
    payload: String,
    #[serde(default)]
    priority: String,
    #[serde(default)]
    expires_in: String,
    #[serde(default)]
    reason: String,
}

/// Lets a form POST in: signed in, and carrying the session's form token.
fn admit(
    hub: &Hub,
    peer: SocketAddr,
    headers: &HeaderMap,
    fields: &Fields,
) -> Result<Viewer, Box<Response>> {
    let viewer = authorize(hub, peer, headers)?;
    if !viewer.form_token_ok(&fields.csrf) {
        return Err(Box::new(page(
            &viewer,
            StatusCode::FORBIDDEN,
            "Refused",
            "<p class=\"error\" role=\"alert\">This form did not come from your console session \
             (its token is missing or stale). Reload the page and try again.</p>",
        )));
    }
    Ok(viewer)
}

fn page(viewer: &Viewer, status: StatusCode, title: &str, body: &str) -> Response {
    let html = frame(viewer, &format!("hub: {title}"), 0, body);
    (status, Html(html)).into_response()
}

/// 404 with a message.
pub fn not_found(viewer: &Viewer, message: &str) -> Response {
    page(
        viewer,
        StatusCode::NOT_FOUND,
        "not found",
        &format!("<p class=\"error\" role=\"alert\">{}</p>", escape(message)),
    )
}

/// The HTTP status of a gRPC one.
fn http_status(code: Code) -> StatusCode {
    match code {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// An error as the CLI prints it.
fn error_text(status: &Status) -> String {
    format!(
        "{}: {}",
        crate::cli::code_name(status.code()),
        status.message()
    )
}

/// A page for a refused call.
pub fn refused(viewer: &Viewer, status: &Status) -> Response {
    page(
        viewer,
        http_status(status.code()),
        "refused",
        &format!(
            "<p class=\"error\" role=\"alert\">{}</p>",
            escape(&error_text(status))
        ),
    )
}

/// The confirmation page of a destructive action: what it does, and the
/// same form with `confirm=yes`.
fn confirm(
    viewer: &Viewer,
    action: &str,
    question: &str,
    button: &str,
    extra: &str,
    back: &str,
) -> Response {
    let body = format!(
        "<h2>Confirm</h2><p>{}</p>{}<input type=\"hidden\" name=\"confirm\" value=\"yes\">{extra}\
         <button type=\"submit\">{}</button> <a href=\"{}\">Back</a></form>",
        escape(question),
        form_open(viewer, action, "confirm"),
        escape(button),
        escape(back),
    );
    page(viewer, StatusCode::OK, "confirm", &body)
}

/// `POST /spokes/{name}/send`: CreateDirective for the spoke.
pub async fn send(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(fields): Form<Fields>,
) -> Response {
    let viewer = match admit(&hub, peer, &headers, &fields) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let request = match create_request(&hub, &name, &fields) {
        Ok(r) => r,
        Err(why) => {
            return super::spoke::with_error(&hub, &viewer, &name, StatusCode::BAD_REQUEST, &why)
                .await;
        }
    };
    let created = AdminApi::new(hub.clone())
        .create_directive(tonic::Request::new(request))
        .await;
    match created {
        Ok(r) => match r.into_inner().directives.first() {
            Some(d) => {
                Redirect::to(&format!("/directives/{}?done=sent", encode(&d.id))).into_response()
            }
            None => Redirect::to(&format!("/spokes/{}", encode(&name))).into_response(),
        },
        Err(status) => {
            let why = error_text(&status);
            super::spoke::with_error(&hub, &viewer, &name, http_status(status.code()), &why).await
        }
    }
}

/// The CreateDirective a send form asks for; what is wrong with the form
/// otherwise (a payload that is no JSON object, numbers that are none).
fn create_request(
    hub: &Hub,
    name: &str,
    fields: &Fields,
) -> Result<proto::CreateDirectiveRequest, String> {
    let payload = match serde_json::from_str::<serde_json::Value>(fields.payload.trim()) {
        Ok(serde_json::Value::Object(map)) => {
            hub_proto::json::from_json(serde_json::Value::Object(map))
        }
        Ok(_) => return Err("INVALID_ARGUMENT: payload: must be a JSON object".to_owned()),
        Err(e) => return Err(format!("INVALID_ARGUMENT: payload: not JSON: {e}")),
    };
    let priority = match fields.priority.trim() {
        "" => 0,
        p => p
            .parse::<i32>()
            .map_err(|_| "INVALID_ARGUMENT: priority: must be a whole number".to_owned())?,
    };
    let expires_at = match fields.expires_in.trim() {
        "" => None,
        s => {
            let seconds =
                s.parse::<i64>().ok().filter(|s| *s > 0).ok_or(
                    "INVALID_ARGUMENT: expires_in: must be a whole number of seconds above 0",
                )?;
            Some(timestamp_ms(
                hub.now_ms().saturating_add(seconds.saturating_mul(1000)),
            ))
        }
    };
    Ok(proto::CreateDirectiveRequest {
        target: Some(proto::DirectiveTarget {
            target: Some(proto::directive_target::Target::SpokeName(name.to_owned())),
        }),
        r#type: fields.kind.clone(),
        payload,
        priority,
        expires_at,
        ..Default::default()
    })
}

/// `POST /directives/{id}/cancel`: CancelDirective, once confirmed.
pub async fn cancel(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(fields): Form<Fields>,
) -> Response {
    let viewer = match admit(&hub, peer, &headers, &fields) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let action = format!("/directives/{}/cancel", encode(&id));
    if fields.confirm != "yes" {
        let extra = format!(
            "<input type=\"hidden\" name=\"reason\" value=\"{}\">",
            escape(&fields.reason)
        );
        let back = format!("/directives/{}", encode(&id));
        return confirm(
            &viewer,
            &action,
            &format!("Cancel directive {id}?"),
            "Cancel it",
            &extra,
            &back,
        );
    }
    let cancelled = AdminApi::new(hub.clone())
        .cancel_directive(tonic::Request::new(proto::CancelDirectiveRequest {
            directive_id: id.clone(),
            reason: fields.reason.trim().to_owned(),
        }))
        .await;
    match cancelled {
        Ok(_) => {
            Redirect::to(&format!("/directives/{}?done=cancelled", encode(&id))).into_response()
        }
        Err(status) => {
            let why = error_text(&status);
            super::directive::render(
                &hub,
                &viewer,
                &id,
                "",
                Some((http_status(status.code()), &why)),
            )
            .await
        }
    }
}

/// A destructive action on a spoke: its path, what it asks, its button.
struct Ask {
    what: &'static str,
    question: String,
    button: &'static str,
}

/// A destructive action on spoke `name`: admitted, confirmed first, then
/// `act` (the AdminService call and what its success shows); a refusal
/// shows the spoke's page with the hub's error.
async fn on_spoke<F, Fut>(
    hub: Hub,
    peer: SocketAddr,
    headers: HeaderMap,
    name: String,
    fields: Fields,
    ask: Ask,
    act: F,
) -> Response
where
    F: FnOnce(AdminApi, String, Viewer) -> Fut,
    Fut: std::future::Future<Output = Result<Response, Status>>,
{
    let viewer = match admit(&hub, peer, &headers, &fields) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let back = format!("/spokes/{}", encode(&name));
    if fields.confirm != "yes" {
        let action = format!("{back}/{}", ask.what);
        return confirm(&viewer, &action, &ask.question, ask.button, "", &back);
    }
    match act(AdminApi::new(hub.clone()), name.clone(), viewer.clone()).await {
        Ok(response) => response,
        Err(status) => {
            let why = error_text(&status);
            super::spoke::with_error(&hub, &viewer, &name, http_status(status.code()), &why).await
        }
    }
}

/// `POST /spokes/{name}/revoke`: RevokeSpoke, once confirmed.
pub async fn revoke(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(fields): Form<Fields>,
) -> Response {
    let ask = Ask {
        what: "revoke",
        question: format!(
            "Revoke spoke {name}? Its key stops working at once and its stream ends."
        ),
        button: "Revoke",
    };
    on_spoke(
        hub,
        peer,
        headers,
        name,
        fields,
        ask,
        |admin, name, _| async move {
            let request = proto::RevokeSpokeRequest {
                spoke_name: name.clone(),
                ..Default::default()
            };
            admin.revoke_spoke(tonic::Request::new(request)).await?;
            Ok(Redirect::to(&format!("/spokes/{}?done=revoked", encode(&name))).into_response())
        },
    )
    .await
}

/// `POST /spokes/{name}/rotate`: RotateSpokeKey, once confirmed; the new
/// key (and webhook secret) shown this once.
pub async fn rotate(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(fields): Form<Fields>,
) -> Response {
    let ask = Ask {
        what: "rotate",
        question: format!(
            "Rotate the key of spoke {name}? Its current key stops working at once; the new one \
             is shown once."
        ),
        button: "Rotate",
    };
    on_spoke(hub, peer, headers, name, fields, ask, |admin, name, viewer| async move {
        let request = proto::RotateSpokeKeyRequest {
            spoke_name: name.clone(),
            ..Default::default()
        };
        let r = admin.rotate_spoke_key(tonic::Request::new(request)).await?.into_inner();
        let secret = if r.webhook_secret.is_empty() {
            String::new()
        } else {
            format!(
                "<p>Its new webhook secret:</p><p><code class=\"secret\" id=\"new-webhook-secret\">{}</code></p>",
                escape(&r.webhook_secret)
            )
        };
        let body = format!(
            "<h2>New key for {}</h2><p>Shown this once: give it to the spoke now.</p>\
             <p><code class=\"secret\" id=\"new-key\">{}</code></p>{secret}\
             <p><a href=\"/spokes/{}\">Back to the spoke</a></p>",
            escape(&name),
            escape(&r.spoke_key),
            encode(&name)
        );
        let mut response = page(&viewer, StatusCode::OK, "new key", &body);
        response.headers_mut().insert(
            axum::http::header::CACHE_CONTROL,
            axum::http::HeaderValue::from_static("no-store"),
        );
        Ok(response)
    })
    .await
}

/// `POST /spokes/{name}/delete`: DeleteSpoke, once confirmed.
pub async fn delete(
    State(hub): State<Hub>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(fields): Form<Fields>,
) -> Response {
    let ask = Ask {
        what: "delete",
        question: format!(
            "Delete spoke {name}? Its key stops working, its directives that are not final are \
             cancelled, and its name is free again."
        ),
        button: "Delete",
    };
    on_spoke(
        hub,
        peer,
        headers,
        name,
        fields,
        ask,
        |admin, name, _| async move {
            let request = proto::DeleteSpokeRequest {
                spoke_name: name,
                ..Default::default()
            };
            admin.delete_spoke(tonic::Request::new(request)).await?;
            Ok(Redirect::to("/?done=deleted").into_response())
        },
    )
    .await
}
