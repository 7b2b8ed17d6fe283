//! SDK errors to cloudbus errors.

use std::sync::Arc;

use aws_sdk_sqs::config::http::HttpResponse;
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use cloudbus_core::Error;

/// What an SDK error is about, for mapping it to a cloudbus error.
#[derive(Clone, Copy)]
pub(crate) struct Subject<'a> {
    pub(crate) transport: &'static str,
    pub(crate) entity: &'static str,
    pub(crate) name: &'a str,
}

/// Maps an SDK error to a cloudbus error: missing entities to `NotFound`, credential and
/// permission failures to `Unauthorized`, throttling, timeouts, connection failures and
/// 5xx to transient `Transport` errors. The message never contains credentials.
pub(crate) fn map_error<E>(
    subject: Subject<'_>,
    action: &str,
    error: SdkError<E, HttpResponse>,
) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let transport = subject.transport;
    let code = error.code().unwrap_or_default().to_string();
    let text = format!("{action}: {}", DisplayErrorContext(&error));
    let status = error.raw_response().map_or(0, |r| r.status().as_u16());
    let not_found = [
        "AWS.SimpleQueueService.NonExistentQueue",
        "QueueDoesNotExist",
        "NotFound",
        "NotFoundException",
    ];
    let unauthorized = [
        "AccessDenied",
        "AccessDeniedException",
        "AuthorizationError",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "UnrecognizedClientException",
        "ExpiredToken",
        "ExpiredTokenException",
        "MissingAuthenticationToken",
        "InvalidSecurity",
        "IncompleteSignature",
    ];
    let throttled = [
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "TooManyRequestsException",
        "KMSThrottling",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "RequestTimeout",
    ];
    let service_answered = matches!(error, SdkError::ServiceError(_));
    let connection_failure = matches!(
        error,
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_)
    );
    let source: Arc<dyn std::error::Error + Send + Sync> = Arc::new(error);
    if not_found.contains(&code.as_str()) {
        return Error::NotFound {
            transport,
            entity: subject.entity,
            name: subject.name.to_string(),
        };
    }
    if unauthorized.contains(&code.as_str()) || status == 401 || status == 403 {
        return Error::Unauthorized {
            transport,
            message: text,
            source: Some(source),
        };
    }
    // The SDK fails before any request when it finds no credentials.
    if !service_answered && text.contains("credentials") {
        return Error::Unauthorized {
            transport,
            message: text,
            source: Some(source),
        };
    }
    let transient =
        connection_failure || throttled.contains(&code.as_str()) || status == 429 || status >= 500;
    Error::Transport {
        transport,
        message: text,
        transient,
        source: Some(source),
    }
}
