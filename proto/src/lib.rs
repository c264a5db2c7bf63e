//! The Hearth wire: `hearth.v1` messages and services generated from `proto/hearth/v1`,
//! hand-written conversions from wire messages to validated domain types, and the transport
//! rules both ends must agree on (TLS material, certificate identity, message size limits),
//! and the MIG geometry both the agent (partitioning) and the controller (placement) use.
//!
//! Nothing here does I/O beyond reading the TLS files it is pointed at.

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod convert;
#[cfg(any(test, feature = "test-fixtures"))]
pub mod fixtures;
#[cfg_attr(test, allow(clippy::unwrap_used))]
pub mod image_ref;
pub mod mig;
pub mod neuron;
pub mod transport;

/// Generated `hearth.v1` code. Other crates convert to domain types at the edge instead of
/// passing these structs deep into their logic.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("hearth.v1");
}

/// KEDA's external scaler contract, served by the controller.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod externalscaler {
    tonic::include_proto!("externalscaler");
}

/// kubelet's PodResources v1 (package `v1`), client and server: the agent lists which pods
/// hold which devices; tests stand up a kubelet-shaped server.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod podresources {
    tonic::include_proto!("v1");
}

/// CRI v1 (package `runtime.v1`), clients of the image and runtime services: the agent pulls
/// and inspects images through the node's container runtime, as the kubelet does.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod cri {
    tonic::include_proto!("runtime.v1");
}

/// containerd's own API, the parts CRI does not cover: writing blobs into the content store,
/// leases that keep them from garbage collection, image labels (pinning), the version.
/// Nested as the packages are, so the generated cross-package paths resolve.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod containerd {
    pub mod types {
        tonic::include_proto!("containerd.types");
    }
    pub mod services {
        pub mod content {
            pub mod v1 {
                tonic::include_proto!("containerd.services.content.v1");
            }
        }
        pub mod images {
            pub mod v1 {
                tonic::include_proto!("containerd.services.images.v1");
            }
        }
        pub mod leases {
            pub mod v1 {
                tonic::include_proto!("containerd.services.leases.v1");
            }
        }
        pub mod version {
            pub mod v1 {
                tonic::include_proto!("containerd.services.version.v1");
            }
        }
    }
}

/// Encoded `FileDescriptorSet` of every hearth.v1 file, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hearth_descriptor.bin"));

/// Wire API major version this build speaks. Bumped only for incompatible changes, which the
/// `fields are only added` rule is meant to make unnecessary.
pub const API_VERSION: u32 = 1;

/// Re-exported so users of the generated types need no direct prost dependency.
pub use prost;
pub use prost_types;
