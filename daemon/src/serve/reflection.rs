//! gRPC server reflection (`grpc.reflection.v1` and `v1alpha`), so `grpcurl -unix` and other tools can
//! discover the services without a `.proto` file.
//!
//! Our own implementation over tonic-reflection's generated messages, because every socket peer may be
//! hostile: tonic-reflection answers from a task of its own that `expect`s each answer to be taken, so a
//! stream closed with an answer pending panics that task (hundreds a second on demand), and it encodes a
//! descriptor again for every request. Here each answer is made from its request as the reply stream is
//! polled: no task, no channel, nothing to panic on, and a peer that does not read its replies (or gives no
//! flow-control window) makes the daemon build none. The descriptors are encoded once, at start.
//!
//! Errors are answered in the stream as `ErrorResponse` messages, as the reflection protocol says, so a
//! client may go on asking on the same stream.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// The files and symbols reflection can describe.
pub struct Index {
    /// Every file, encoded once.
    files: Vec<Vec<u8>>,
    /// File name → index in `files`.
    by_name: HashMap<String, usize>,
    /// Fully qualified symbol (package, service, method, message, field, enum, enum value) → file.
    by_symbol: HashMap<String, usize>,
    /// Fully qualified names of the services, sorted.
    services: Vec<String>,
}

/// What a reflection request asks, the same in both protocol versions.
enum Ask {
    File(String),
    Symbol(String),
    Extension,
    ExtensionNumbers(String),
    Services,
    Nothing,
}

/// The answer to an [`Ask`].
enum Answer {
    Files(Vec<Vec<u8>>),
    ExtensionNumbers(String),
    Services(Vec<String>),
    Error(tonic::Code, String),
}

impl Index {
    /// Indexes encoded `FileDescriptorSet`s (the first file of a name wins; a file without a name cannot be
    /// asked for and is left out).
    ///
    /// # Errors
    /// When one does not decode.
    pub fn new(sets: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let mut index = Self {
            files: Vec::new(),
            by_name: HashMap::new(),
            by_symbol: HashMap::new(),
            services: Vec::new(),
        };
        for set in sets {
            for file in FileDescriptorSet::decode(*set)?.file {
                let Some(name) = file.name.clone() else {
                    continue;
                };
                if index.by_name.contains_key(&name) {
                    continue;
                }
                let i = index.files.len();
                index.files.push(file.encode_to_vec());
                index.by_name.insert(name, i);
                index.add_symbols(&file, i);
            }
        }
        index.services.sort();
        Ok(index)
    }

    fn add_symbols(&mut self, file: &FileDescriptorProto, i: usize) {
        let package = file.package.as_deref().unwrap_or("");
        for service in &file.service {
            let name = qualify(package, service.name());
            for method in &service.method {
                self.by_symbol.insert(qualify(&name, method.name()), i);
            }
            self.services.push(name.clone());
            self.by_symbol.insert(name, i);
        }
        for message in &file.message_type {
            self.add_message(package, message, i);
        }
        for e in &file.enum_type {
            self.add_enum(package, e, i);
        }
    }

    fn add_message(&mut self, scope: &str, message: &DescriptorProto, i: usize) {
        let name = qualify(scope, message.name());
        for field in &message.field {
            self.by_symbol.insert(qualify(&name, field.name()), i);
        }
        for oneof in &message.oneof_decl {
            self.by_symbol.insert(qualify(&name, oneof.name()), i);
        }
        for nested in &message.nested_type {
            self.add_message(&name, nested, i);
        }
        for e in &message.enum_type {
            self.add_enum(&name, e, i);
        }
        self.by_symbol.insert(name, i);
    }

    fn add_enum(&mut self, scope: &str, e: &EnumDescriptorProto, i: usize) {
        let name = qualify(scope, e.name());
        for value in &e.value {
            self.by_symbol.insert(qualify(&name, value.name()), i);
        }
        self.by_symbol.insert(name, i);
    }

    /// The names of the services described.
    pub fn services(&self) -> &[String] {
        &self.services
    }

    fn answer(&self, ask: Ask) -> Answer {
        let file = |i: Option<&usize>, what: &str, name: &str| match i {
            Some(&i) => Answer::Files(vec![self.files[i].clone()]),
            None => Answer::Error(
                tonic::Code::NotFound,
                format!("{what} {} not found", crate::text::clip_escaped(name)),
            ),
        };
        match ask {
            Ask::File(name) => file(self.by_name.get(&name), "file", &name),
            Ask::Symbol(name) => file(self.by_symbol.get(&name), "symbol", &name),
            Ask::Extension => Answer::Error(
                tonic::Code::NotFound,
                "extensions are not supported".to_owned(),
            ),
            // grpcurl expects an answer, not an error, for a message without extensions.
            Ask::ExtensionNumbers(name) => Answer::ExtensionNumbers(name),
            Ask::Services => Answer::Services(self.services.clone()),
            Ask::Nothing => Answer::Error(
                tonic::Code::InvalidArgument,
                "the request asks for nothing".to_owned(),
            ),
        }
    }
}

fn qualify(scope: &str, name: &str) -> String {
    if scope.is_empty() {
        name.to_owned()
    } else {
        format!("{scope}.{name}")
    }
}

/// The reflection service of one protocol version, over a shared [`Index`].
#[derive(Clone)]
pub struct Reflection {
    index: Arc<Index>,
}

impl Reflection {
    /// Serves `index`.
    pub fn new(index: Arc<Index>) -> Self {
        Self { index }
    }
}

type Replies<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Implements one protocol version: both have the same messages in different packages.
macro_rules! version {
    ($pb:path) => {
        use pb::server_reflection_request::MessageRequest as Req;
        use pb::server_reflection_response::MessageResponse as Res;
        use $pb as pb;

        fn ask(request: &pb::ServerReflectionRequest) -> super::Ask {
            use super::Ask;
            match &request.message_request {
                Some(Req::FileByFilename(name)) => Ask::File(name.clone()),
                Some(Req::FileContainingSymbol(name)) => Ask::Symbol(name.clone()),
                Some(Req::FileContainingExtension(_)) => Ask::Extension,
                Some(Req::AllExtensionNumbersOfType(name)) => Ask::ExtensionNumbers(name.clone()),
                Some(Req::ListServices(_)) => Ask::Services,
                None => Ask::Nothing,
            }
        }

        fn reply(
            index: &super::Index,
            request: pb::ServerReflectionRequest,
        ) -> pb::ServerReflectionResponse {
            use super::Answer;
            let response = match index.answer(ask(&request)) {
                Answer::Files(files) => Res::FileDescriptorResponse(pb::FileDescriptorResponse {
                    file_descriptor_proto: files,
                }),
                Answer::ExtensionNumbers(name) => {
                    Res::AllExtensionNumbersResponse(pb::ExtensionNumberResponse {
                        base_type_name: name,
                        extension_number: Vec::new(),
                    })
                }
                Answer::Services(names) => Res::ListServicesResponse(pb::ListServiceResponse {
                    service: names
                        .into_iter()
                        .map(|name| pb::ServiceResponse { name })
                        .collect(),
                }),
                Answer::Error(code, message) => Res::ErrorResponse(pb::ErrorResponse {
                    error_code: code as i32,
                    error_message: message,
                }),
            };
            pb::ServerReflectionResponse {
                valid_host: request.host.clone(),
                original_request: Some(request),
                message_response: Some(response),
            }
        }

        #[tonic::async_trait]
        impl pb::server_reflection_server::ServerReflection for super::Reflection {
            type ServerReflectionInfoStream = super::Replies<pb::ServerReflectionResponse>;

            async fn server_reflection_info(
                &self,
                request: tonic::Request<tonic::Streaming<pb::ServerReflectionRequest>>,
            ) -> Result<tonic::Response<Self::ServerReflectionInfoStream>, tonic::Status> {
                let index = self.index.clone();
                Ok(super::replies(request, move |r| reply(&index, r)))
            }
        }

        /// The service, ready to be served.
        pub fn server(
            reflection: super::Reflection,
        ) -> pb::server_reflection_server::ServerReflectionServer<super::Reflection> {
            pb::server_reflection_server::ServerReflectionServer::new(reflection)
                .max_decoding_message_size(crate::serve::server::MAX_MESSAGE_LEN)
        }
    };
}

/// One reply per request, made as the reply stream is polled.
fn replies<Q, A>(
    request: Request<Streaming<Q>>,
    reply: impl Fn(Q) -> A + Send + 'static,
) -> Response<Replies<A>>
where
    Q: Send + 'static,
    A: Send + 'static,
{
    let stream = request.into_inner().map(move |r| r.map(&reply));
    Response::new(Box::pin(stream))
}

/// `grpc.reflection.v1` (grpcurl asks for it first).
pub mod v1 {
    version!(tonic_reflection::pb::v1);
}

/// `grpc.reflection.v1alpha` (Python's grpcio-reflection and older tools know only this one).
pub mod v1alpha {
    version!(tonic_reflection::pb::v1alpha);
}

/// The index of everything the daemon serves: both APIs, health, and reflection itself.
///
/// # Errors
/// When a built-in descriptor set does not decode (a build defect).
pub fn index() -> Result<Arc<Index>, prost::DecodeError> {
    Index::new(&[
        credbroker_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ])
    .map(Arc::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_method_and_message_is_found_in_its_file() {
        let index = index().unwrap();
        for service in [
            "credbroker.v1.TokenBroker",
            "credbroker.admin.v1.Admin",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ] {
            assert!(index.services().iter().any(|s| s == service), "{service}");
        }
        for symbol in [
            "credbroker.v1.TokenBroker.GetToken",
            "credbroker.v1.GetTokenRequest",
            "credbroker.v1.GetTokenRequest.scopes",
            "credbroker.admin.v1.Admin",
        ] {
            let Answer::Files(files) = index.answer(Ask::Symbol(symbol.to_owned())) else {
                panic!("{symbol} not found");
            };
            let file = FileDescriptorProto::decode(&files[0][..]).unwrap();
            assert!(
                symbol.starts_with(file.package()),
                "{symbol} in {:?}",
                file.name
            );
        }
        // Imports can be fetched by name, as grpcurl does next.
        assert!(matches!(
            index.answer(Ask::File("google/protobuf/timestamp.proto".to_owned())),
            Answer::Files(_)
        ));
        let Answer::Error(code, message) = index.answer(Ask::Symbol("no.Such\n".to_owned())) else {
            panic!("found");
        };
        assert_eq!(code, tonic::Code::NotFound);
        assert!(!message.contains('\n'), "{message}");
    }
}
