//! Validation, as Knative's webhook and the API server would do it, plus the defaults they
//! apply (namespaces, a lone split's 100 %).

use std::collections::BTreeSet;
use std::net::IpAddr;

use base64::Engine as _;

use crate::k8s::*;
use crate::Object;

/// An invalid field: where, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

fn err<T>(field: impl Into<String>, reason: impl Into<String>) -> Result<T, FieldError> {
    Err(FieldError {
        field: field.into(),
        reason: reason.into(),
    })
}

/// The certificate chain and key of a `kubernetes.io/tls` Secret, decoded (PEM).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsKeyPair {
    pub cert_chain_pem: String,
    pub private_key_pem: String,
}

/// Validates and normalises an object in place.
pub(crate) fn validate(object: &mut Object) -> Result<(), FieldError> {
    match object {
        Object::Ingress(i) => validate_ingress(i),
        Object::Service(s) => validate_service(s),
        Object::Endpoints(e) => validate_endpoints(e),
        Object::EndpointSlice(s) => validate_slice(s),
        Object::TlsSecret(s, pair) => {
            *pair = decode_tls(s)?;
            Ok(())
        }
        // Validated by `serving::parse_serving_documents`, with Knative's own field paths.
        Object::Serving(_) => Ok(()),
    }
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '*'))
}

fn validate_ingress(ingress: &mut Ingress) -> Result<(), FieldError> {
    let namespace = ingress.metadata.namespace.clone();
    if ingress.spec.rules.is_empty() {
        return err("spec.rules", "at least one rule is required");
    }
    for (r, rule) in ingress.spec.rules.iter_mut().enumerate() {
        let at = format!("spec.rules[{r}]");
        if rule.hosts.is_empty() {
            return err(format!("{at}.hosts"), "at least one host is required");
        }
        for (h, host) in rule.hosts.iter().enumerate() {
            if !valid_host(host) {
                return err(
                    format!("{at}.hosts[{h}]"),
                    format!("{host:?} is not a valid host name"),
                );
            }
        }
        let Some(http) = rule.http.as_mut() else {
            return err(format!("{at}.http"), "is required");
        };
        if http.paths.is_empty() {
            return err(format!("{at}.http.paths"), "at least one path is required");
        }
        for (p, path) in http.paths.iter_mut().enumerate() {
            let at = format!("{at}.http.paths[{p}]");
            if !path.path.is_empty() && !path.path.starts_with('/') {
                return err(
                    format!("{at}.path"),
                    format!("{:?} must start with '/'", path.path),
                );
            }
            if path.splits.is_empty() {
                return err(format!("{at}.splits"), "at least one split is required");
            }
            if path.splits.len() == 1 && path.splits[0].percent == 0 {
                // Knative: a lone split takes all traffic.
                path.splits[0].percent = 100;
            }
            let mut total = 0;
            for (s, split) in path.splits.iter_mut().enumerate() {
                let at = format!("{at}.splits[{s}]");
                if split.service_name.is_empty() {
                    return err(format!("{at}.serviceName"), "is required");
                }
                if split.service_namespace.is_empty() {
                    split.service_namespace = namespace.clone();
                }
                if !(0..=100).contains(&split.percent) {
                    return err(
                        format!("{at}.percent"),
                        format!("{} is not between 0 and 100", split.percent),
                    );
                }
                match &split.service_port {
                    IntOrString::Int(p) if !(1..=65535).contains(p) => {
                        return err(
                            format!("{at}.servicePort"),
                            format!("{p} is not a port number"),
                        );
                    }
                    IntOrString::String(s) if s.is_empty() => {
                        return err(format!("{at}.servicePort"), "is empty");
                    }
                    _ => {}
                }
                total += split.percent;
            }
            if total != 100 {
                return err(
                    format!("{at}.splits"),
                    format!("percents add up to {total}, not 100"),
                );
            }
        }
    }
    for (t, tls) in ingress.spec.tls.iter_mut().enumerate() {
        if tls.hosts.is_empty() {
            return err(
                format!("spec.tls[{t}].hosts"),
                "at least one host is required",
            );
        }
        if tls.secret_name.is_empty() {
            return err(format!("spec.tls[{t}].secretName"), "is required");
        }
        if tls.secret_namespace.is_empty() {
            tls.secret_namespace = namespace.clone();
        }
    }
    Ok(())
}

fn validate_service(service: &mut Service) -> Result<(), FieldError> {
    if service.spec.type_ == "ExternalName" && service.spec.external_name.is_empty() {
        return err("spec.externalName", "is required for type ExternalName");
    }
    let mut names = BTreeSet::new();
    for (i, port) in service.spec.ports.iter().enumerate() {
        if !(1..=65535).contains(&port.port) {
            return err(
                format!("spec.ports[{i}].port"),
                format!("{} is not a port number", port.port),
            );
        }
        if !port.name.is_empty() && !names.insert(port.name.as_str()) {
            return err(
                format!("spec.ports[{i}].name"),
                format!("{:?} is used by another port", port.name),
            );
        }
        if let Some(IntOrString::Int(p)) = port.target_port {
            if !(1..=65535).contains(&p) {
                return err(
                    format!("spec.ports[{i}].targetPort"),
                    format!("{p} is not a port number"),
                );
            }
        }
    }
    Ok(())
}

fn check_ip(field: String, ip: &str) -> Result<(), FieldError> {
    ip.parse::<IpAddr>()
        .map(|_| ())
        .or_else(|_| err(field, format!("{ip:?} is not an IP address")))
}

fn validate_endpoints(endpoints: &mut Endpoints) -> Result<(), FieldError> {
    for (s, subset) in endpoints.subsets.iter().enumerate() {
        for (a, address) in subset.addresses.iter().enumerate() {
            check_ip(format!("subsets[{s}].addresses[{a}].ip"), &address.ip)?;
        }
        for (p, port) in subset.ports.iter().enumerate() {
            if !(1..=65535).contains(&port.port) {
                return err(
                    format!("subsets[{s}].ports[{p}].port"),
                    format!("{} is not a port number", port.port),
                );
            }
        }
    }
    Ok(())
}

fn validate_slice(slice: &mut EndpointSlice) -> Result<(), FieldError> {
    if !slice.metadata.labels.contains_key(SERVICE_NAME_LABEL) {
        return err(
            format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
            "is required to tie the slice to its Service",
        );
    }
    for (e, endpoint) in slice.endpoints.iter().enumerate() {
        for (a, address) in endpoint.addresses.iter().enumerate() {
            check_ip(format!("endpoints[{e}].addresses[{a}]"), address)?;
        }
    }
    for (p, port) in slice.ports.iter().enumerate() {
        if !(1..=65535).contains(&port.port) {
            return err(
                format!("ports[{p}].port"),
                format!("{} is not a port number", port.port),
            );
        }
    }
    Ok(())
}

fn decode_tls(secret: &Secret) -> Result<TlsKeyPair, FieldError> {
    let get = |key: &str| -> Result<String, FieldError> {
        if let Some(plain) = secret.string_data.get(key) {
            return Ok(plain.clone());
        }
        let Some(encoded) = secret.data.get(key) else {
            return err(
                format!("data[{key}]"),
                "is required in a kubernetes.io/tls Secret",
            );
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded.split_whitespace().collect::<String>())
            .or_else(|e| err(format!("data[{key}]"), format!("is not base64: {e}")))?;
        String::from_utf8(bytes).or_else(|_| err(format!("data[{key}]"), "is not PEM text"))
    };
    let pair = TlsKeyPair {
        cert_chain_pem: get("tls.crt")?,
        private_key_pem: get("tls.key")?,
    };
    if !pair.cert_chain_pem.contains("-----BEGIN CERTIFICATE-----") {
        return err("data[tls.crt]", "holds no PEM certificate");
    }
    if !pair.private_key_pem.contains("PRIVATE KEY-----") {
        return err("data[tls.key]", "holds no PEM private key");
    }
    Ok(pair)
}
