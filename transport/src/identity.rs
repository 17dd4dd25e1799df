//! Cluster identity: a cluster CA signs one certificate per node, and every
//! connection is mutual TLS 1.3 against that CA alone.
//!
//! A node's id lives in its certificate as the DNS name `node-<id>.ferry`. A client
//! dials a peer with that name as the TLS server name, so rustls refuses a server whose
//! certificate is for another node. The server learns the client's id from the hello
//! (`protocol.rs`) and checks it against the client's certificate with webpki before
//! answering; a certificate from another CA never gets that far.
//!
//! Node certificates expire ([`NODE_CERT_VALIDITY`], a year; webpki refuses an
//! expired one in the handshake) and a removed node's are refused through the
//! [`RevocationList`] the verifiers consult (`revocation.rs`).

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};

use crate::error::IdentityError;
use crate::protocol::ALPN;
use crate::revocation::{ClientVerifier, RevocationList, ServerVerifier};
use crate::NodeId;

/// The TLS name of a node's certificate.
pub fn node_server_name(node: NodeId) -> String {
    format!("node-{node}.ferry")
}

fn gen_err(e: rcgen::Error) -> IdentityError {
    IdentityError::Generate(e.to_string())
}

/// The certificate authority of one cluster. Whoever holds its key can admit nodes;
/// keep `key_pem()` off the nodes themselves in production.
pub struct ClusterCa {
    name: String,
    key: KeyPair,
    cert_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn ca_params(cluster_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cluster_name);
    params.distinguished_name = dn;
    // Path length 0: the CA signs node certificates, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl ClusterCa {
    /// A fresh CA (ECDSA P-256) named after the cluster.
    pub fn generate(cluster_name: &str) -> Result<ClusterCa, IdentityError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = ca_params(cluster_name).self_signed(&key).map_err(gen_err)?;
        Ok(ClusterCa {
            name: cluster_name.to_owned(),
            key,
            cert_pem: cert.pem(),
        })
    }

    /// Loads a CA saved with [`cert_pem`](Self::cert_pem) and [`key_pem`](Self::key_pem).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, IdentityError> {
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| IdentityError::Pem(format!("CA certificate: {e}")))?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| IdentityError::Pem(format!("CA key: {e}")))?;
        let anchor = webpki::anchor_from_trusted_cert(&der)
            .map_err(|e| IdentityError::Pem(format!("CA certificate: {e}")))?;
        // The SPKI ends with the BIT STRING holding the raw public key.
        let spki = webpki::spki_for_anchor(&anchor);
        if key.der_bytes().is_empty() || !spki.as_ref().ends_with(key.der_bytes()) {
            return Err(IdentityError::Pem(
                "the key does not belong to the CA certificate".into(),
            ));
        }
        let name = common_name(anchor.subject.as_ref()).ok_or_else(|| {
            IdentityError::Pem("not a Ferry cluster CA: subject is not a single CN".into())
        })?;
        Ok(ClusterCa {
            name,
            key,
            cert_pem: cert_pem.to_owned(),
        })
    }

    pub fn cluster_name(&self) -> &str {
        &self.name
    }

    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Signs a certificate for `node_id`, usable both as TLS client and server,
    /// valid for [`NODE_CERT_VALIDITY`] from now.
    pub fn issue(&self, node_id: NodeId) -> Result<NodeCredentials, IdentityError> {
        self.issue_with(node_id, Validity::starting_now(NODE_CERT_VALIDITY))
    }

    /// [`issue`](Self::issue) with a chosen validity (tests issue expired ones).
    pub fn issue_with(
        &self,
        node_id: NodeId,
        validity: Validity,
    ) -> Result<NodeCredentials, IdentityError> {
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.not_before = unix_time(validity.not_before_s)?;
        params.not_after = unix_time(validity.not_after_s)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("node-{node_id}"));
        dn.push(DnType::OrganizationName, self.name.as_str());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(
            node_server_name(node_id).try_into().map_err(gen_err)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::new(ca_params(&self.name), &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
        Ok(NodeCredentials {
            node_id,
            ca_cert_pem: self.cert_pem.clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl ClusterCa {
    /// Signs a TLS server certificate for a node's HTTP API, valid for
    /// [`NODE_CERT_VALIDITY`], whose subject alternative names are `dns_names`
    /// and `ips` (what clients reach the API by). Returns (certificate PEM,
    /// key PEM). Server auth only: it cannot pass for a node on the cluster's
    /// streams, whose names are `node-<id>.ferry`.
    pub fn issue_api_server(
        &self,
        dns_names: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<(String, String), IdentityError> {
        let validity = Validity::starting_now(NODE_CERT_VALIDITY);
        let key = KeyPair::generate().map_err(gen_err)?;
        let mut params = CertificateParams::default();
        params.not_before = unix_time(validity.not_before_s)?;
        params.not_after = unix_time(validity.not_after_s)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            dns_names.first().map_or("ferry-api", String::as_str),
        );
        dn.push(DnType::OrganizationName, self.name.as_str());
        params.distinguished_name = dn;
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.clone().try_into().map_err(gen_err)?));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::new(ca_params(&self.name), &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// How long a node certificate [`ClusterCa::issue`] signs is valid: a year.
/// `ferry node renew-cert` issues the next one.
pub const NODE_CERT_VALIDITY: std::time::Duration = std::time::Duration::from_secs(365 * 86_400);

/// How far a new certificate's `notBefore` lies in the past, so a peer whose
/// clock is a little behind the signer's does not see it as not yet valid.
pub const CLOCK_SKEW_ALLOWANCE_S: u64 = 60;

/// A certificate's validity, in Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before_s: i64,
    pub not_after_s: i64,
}

impl Validity {
    /// From [`CLOCK_SKEW_ALLOWANCE_S`] ago until `valid_for` from now.
    pub fn starting_now(valid_for: std::time::Duration) -> Validity {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Validity {
            not_before_s: now.saturating_sub(CLOCK_SKEW_ALLOWANCE_S) as i64,
            not_after_s: now.saturating_add(valid_for.as_secs()).min(i64::MAX as u64) as i64,
        }
    }

    pub fn from_unix(not_before_s: i64, not_after_s: i64) -> Validity {
        Validity {
            not_before_s,
            not_after_s,
        }
    }
}

fn unix_time(s: i64) -> Result<time::OffsetDateTime, IdentityError> {
    time::OffsetDateTime::from_unix_timestamp(s)
        .map_err(|e| IdentityError::Generate(format!("certificate time {s}: {e}")))
}

/// Reads the common name out of a DER `Name` (without its outer SEQUENCE header, as
/// webpki hands it out) made of exactly one RDN holding one CN: the shape
/// [`ClusterCa::generate`] writes.
fn common_name(name: &[u8]) -> Option<String> {
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 2 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |a, &b| (a << 8) | usize::from(b));
            (len, &rest[n..])
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }
    let (0x31, set, rest) = tlv(name)? else {
        return None;
    };
    if !rest.is_empty() {
        return None;
    }
    let (0x30, atv, _) = tlv(set)? else {
        return None;
    };
    let (0x06, oid, value) = tlv(atv)? else {
        return None;
    };
    if oid != [0x55, 0x04, 0x03] {
        return None;
    }
    let (0x0c | 0x13, s, _) = tlv(value)? else {
        return None;
    };
    String::from_utf8(s.to_vec()).ok()
}

/// What one node needs to join connections: its id, the cluster CA certificate, its
/// own certificate and key (all PEM). Serializable for config files; the key is secret.
#[derive(Clone, Serialize, Deserialize)]
pub struct NodeCredentials {
    pub node_id: NodeId,
    pub ca_cert_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

const NODE_ID_LINE: &str = "ferry-node-id:";

impl NodeCredentials {
    /// One text file: a `ferry-node-id: <id>` line, then the node certificate, the CA
    /// certificate and the node key as PEM blocks.
    pub fn to_pem(&self) -> String {
        format!(
            "{NODE_ID_LINE} {}\n{}\n{}\n{}",
            self.node_id,
            self.cert_pem.trim_end(),
            self.ca_cert_pem.trim_end(),
            self.key_pem
        )
    }

    /// Reads what [`to_pem`](Self::to_pem) wrote and checks that the certificate is the
    /// node's.
    pub fn from_pem(text: &str) -> Result<NodeCredentials, IdentityError> {
        let node_id = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(NODE_ID_LINE))
            .ok_or_else(|| IdentityError::Pem(format!("missing `{NODE_ID_LINE}` line")))?
            .trim()
            .parse::<NodeId>()
            .map_err(|e| IdentityError::Pem(format!("bad node id: {e}")))?;
        let blocks = pem_blocks(text);
        let certs: Vec<&str> = blocks
            .iter()
            .filter(|(label, _)| *label == "CERTIFICATE")
            .map(|(_, b)| *b)
            .collect();
        let key = blocks
            .iter()
            .find(|(label, _)| label.ends_with("PRIVATE KEY"))
            .map(|(_, b)| *b);
        let (&[cert, ca], Some(key)) = (certs.as_slice(), key) else {
            return Err(IdentityError::Pem(
                "expected two certificates (node, CA) and one private key".into(),
            ));
        };
        let creds = NodeCredentials {
            node_id,
            ca_cert_pem: format!("{ca}\n"),
            cert_pem: format!("{cert}\n"),
            key_pem: format!("{key}\n"),
        };
        creds.check()?;
        Ok(creds)
    }

    /// The certificate's validity (Unix seconds), read from its DER.
    pub fn validity(&self) -> Result<Validity, IdentityError> {
        let cert = self.parse()?.cert;
        let (from, to) = crate::revocation::validity_unix(cert.as_ref())
            .ok_or_else(|| IdentityError::Pem("node certificate: unreadable validity".into()))?;
        Ok(Validity::from_unix(from, to))
    }

    /// Parses everything and checks the certificate names this node.
    pub fn check(&self) -> Result<(), IdentityError> {
        let parsed = self.parse()?;
        verify_cert_names_node(&parsed.cert, self.node_id)
    }

    fn parse(&self) -> Result<ParsedCredentials, IdentityError> {
        let pem = |what: &str, e: rustls::pki_types::pem::Error| {
            IdentityError::Pem(format!("{what}: {e}"))
        };
        Ok(ParsedCredentials {
            ca: CertificateDer::from_pem_slice(self.ca_cert_pem.as_bytes())
                .map_err(|e| pem("CA certificate", e))?,
            cert: CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
                .map_err(|e| pem("node certificate", e))?,
            key: PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
                .map_err(|e| pem("node key", e))?,
        })
    }
}

/// `(label, whole block)` for every PEM block in `text`.
fn pem_blocks(text: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN ") {
        let after = &rest[start + "-----BEGIN ".len()..];
        let Some(label_end) = after.find("-----") else {
            break;
        };
        let label = &after[..label_end];
        let end_marker = format!("-----END {label}-----");
        let Some(end) = rest[start..].find(&end_marker) else {
            break;
        };
        let block_end = start + end + end_marker.len();
        out.push((label, &rest[start..block_end]));
        rest = &rest[block_end..];
    }
    out
}

struct ParsedCredentials {
    ca: CertificateDer<'static>,
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
}

/// Checks that `cert` (already verified against the CA by TLS) names `node`.
pub(crate) fn verify_cert_names_node(
    cert: &CertificateDer<'_>,
    node: NodeId,
) -> Result<(), IdentityError> {
    let wrong = |reason: String| IdentityError::WrongNode { node, reason };
    let ee = webpki::EndEntityCert::try_from(cert).map_err(|e| wrong(e.to_string()))?;
    let name = ServerName::try_from(node_server_name(node)).map_err(|e| wrong(e.to_string()))?;
    ee.verify_is_valid_for_subject_name(&name)
        .map_err(|e| wrong(e.to_string()))
}

/// A quinn client configuration presenting `creds`, trusting only their CA, with the
/// RPC transport settings of `cfg`. `RpcNode` builds its own; this is for tools and
/// tests that speak the protocol by hand (dial with [`node_server_name`] as the name).
pub fn client_config(
    creds: &NodeCredentials,
    cfg: &crate::NetworkConfig,
) -> Result<quinn::ClientConfig, IdentityError> {
    let tls = tls_configs(creds)?;
    let mut client = quinn::ClientConfig::new(tls.client);
    client.transport_config(Arc::new(crate::endpoint::transport_config(
        cfg,
        cfg.mtu,
        cfg.mtu_ceiling.max(cfg.mtu),
        cfg.idle_timeout,
        cfg.keepalive_interval,
    )));
    Ok(client)
}

/// The QUIC crypto configurations of a node, built once at start.
#[derive(Clone)]
pub(crate) struct TlsConfigs {
    pub server: Arc<quinn::crypto::rustls::QuicServerConfig>,
    pub client: Arc<quinn::crypto::rustls::QuicClientConfig>,
}

/// The crypto of every TLS session a node opens: ring, with AES-128-GCM first.
///
/// The provider's default order puts AES-256-GCM first, and both ends' order
/// decides what a session negotiates. On AES-NI CPUs AES-128 costs about a
/// quarter less per byte, the page stream's largest per-byte cost, and its
/// strength is ample for a cluster's private networks. Benchmarks use this
/// provider too, so a TLS baseline runs the same cipher as the stream.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        _ => 2,
    });
    provider
}

pub(crate) fn tls_configs(creds: &NodeCredentials) -> Result<TlsConfigs, IdentityError> {
    tls_configs_revoking(creds, RevocationList::default())
}

/// The TLS configurations of a node whose verifiers (both directions) also
/// refuse the certificates `revoked` names (`revocation.rs`); the list can
/// change while the configurations are in use.
pub(crate) fn tls_configs_revoking(
    creds: &NodeCredentials,
    revoked: RevocationList,
) -> Result<TlsConfigs, IdentityError> {
    let tls = |e: &dyn std::fmt::Display| IdentityError::Tls(e.to_string());
    let parsed = creds.parse()?;
    verify_cert_names_node(&parsed.cert, creds.node_id)?;
    let provider = Arc::new(crypto_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(parsed.ca).map_err(|e| tls(&e))?;
    let roots = Arc::new(roots);

    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        roots.clone(),
        provider.clone(),
    )
    .build()
    .map_err(|e| tls(&e))?;
    let client_verifier = Arc::new(ClientVerifier {
        inner: client_verifier,
        revoked: revoked.clone(),
    });
    let server_verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| tls(&e))?;
    let server_verifier = Arc::new(ServerVerifier {
        inner: server_verifier,
        revoked,
    });
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(vec![parsed.cert.clone()], parsed.key.clone_key())
        .map_err(|e| tls(&e))?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    // No resumption: every connection presents and checks full certificates, so the
    // identity a hello is checked against is always the one just verified.
    server.send_tls13_tickets = 0;
    server.max_early_data_size = 0;

    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls(&e))?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier)
        .with_client_auth_cert(vec![parsed.cert], parsed.key)
        .map_err(|e| tls(&e))?;
    client.alpn_protocols = vec![ALPN.to_vec()];
    client.resumption = rustls::client::Resumption::disabled();

    Ok(TlsConfigs {
        server: Arc::new(
            quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(|e| tls(&e))?,
        ),
        client: Arc::new(
            quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(|e| tls(&e))?,
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_prefer_aes_128_gcm() {
        let suites: Vec<_> = crypto_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(suites[0], rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        // Nothing was dropped, only reordered.
        assert_eq!(
            suites.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
    }

    #[test]
    fn ca_round_trips_through_pem_and_keeps_signing_valid_certs() {
        let ca = ClusterCa::generate("prod-east").unwrap();
        let again = ClusterCa::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(again.cluster_name(), "prod-east");
        let creds = again.issue(3).unwrap();
        // Same CA certificate, so the new node trusts old nodes and vice versa.
        assert_eq!(creds.ca_cert_pem, ca.cert_pem());
        creds.check().unwrap();
        tls_configs(&creds).unwrap();

        let other = ClusterCa::generate("other").unwrap();
        assert!(ClusterCa::from_pem(&ca.cert_pem(), &other.key_pem()).is_err());
    }

    #[test]
    fn credentials_round_trip_and_node_id_is_bound_to_the_cert() {
        let ca = ClusterCa::generate("c").unwrap();
        let creds = ca.issue(12).unwrap();
        let text = creds.to_pem();
        let back = NodeCredentials::from_pem(&text).unwrap();
        assert_eq!(back.node_id, 12);
        assert_eq!(back.cert_pem, creds.cert_pem);
        let lying = text.replace("ferry-node-id: 12", "ferry-node-id: 13");
        assert!(matches!(
            NodeCredentials::from_pem(&lying),
            Err(IdentityError::WrongNode { node: 13, .. })
        ));
    }
}
