//! The web tier's Service: port 80 to the web container's port (`http` for
//! `tidepool web`, `app` for an application's process).

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::labels;
use crate::plan::Tier;
use crate::validate::Owner;

pub fn web_service(owner: &Owner, target_port: &str) -> Service {
    Service {
        metadata: labels::metadata(owner, Tier::Web),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(labels::selector(owner, Tier::Web)),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: 80,
                target_port: Some(IntOrString::String(target_port.to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}
