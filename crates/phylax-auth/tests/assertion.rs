//! Client assertions with real keys: ES384 (ring-generated) and RS384
//! (RSA-2048 from the `rsa` crate), and every way an attacker might bend one.
#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use phylax_auth::assertion::{parse_jwks, peek_issuer, Verifier};
use phylax_auth::client_key;
use rsa::pkcs1::EncodeRsaPrivateKey;
use rsa::traits::PublicKeyParts;
use serde_json::json;

const URL: &str = "https://127.0.0.1:8443/auth/token";
const NOW: i64 = 1_700_000_000;

fn claims(iss: &str, aud: &str, exp: i64, jti: &str) -> serde_json::Value {
    json!({"iss": iss, "sub": iss, "aud": aud, "exp": exp, "iat": NOW, "jti": jti})
}

fn rsa_key() -> (EncodingKey, String) {
    let mut rng = rand::thread_rng();
    let k = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
    let pem = k.to_pkcs1_pem(rsa::pkcs1::LineEnding::LF).unwrap();
    let jwks = json!({"keys": [{"kty": "RSA", "kid": "r1", "alg": "RS384", "use": "sig",
        "n": URL_SAFE_NO_PAD.encode(k.n().to_bytes_be()), "e": URL_SAFE_NO_PAD.encode(k.e().to_bytes_be())}]});
    (
        EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        jwks.to_string(),
    )
}

#[test]
fn es384_assertion_verifies_and_hostile_variants_fail() {
    let v = Verifier::new(URL).unwrap();
    let g = client_key::generate().unwrap();
    let keys = parse_jwks(&g.jwks).unwrap();
    let a =
        client_key::sign_assertion(g.private_pem.expose(), Some(&g.kid), "c1", URL, NOW).unwrap();
    assert_eq!(peek_issuer(&a).as_deref(), Some("c1"));
    let ok = v.verify(&a, "c1", Some(&keys), NOW).unwrap();
    assert_eq!(ok.client_id, "c1");
    // Wrong client id for these keys, unknown client, expired, wrong audience.
    assert!(v.verify(&a, "c2", Some(&keys), NOW).is_err());
    assert!(v.verify(&a, "c1", None, NOW).is_err());
    assert!(v.verify(&a, "c1", Some(&keys), NOW + 3600).is_err());
    let other = Verifier::new("https://evil.example/token").unwrap();
    assert!(other.verify(&a, "c1", Some(&keys), NOW).is_err());
    // Another key pair's signature.
    let g2 = client_key::generate().unwrap();
    let forged =
        client_key::sign_assertion(g2.private_pem.expose(), Some(&g.kid), "c1", URL, NOW).unwrap();
    assert!(v.verify(&forged, "c1", Some(&keys), NOW).is_err());
    // Tampered payload (claims swapped in, signature kept).
    let parts: Vec<&str> = a.split('.').collect();
    let evil = URL_SAFE_NO_PAD.encode(claims("c1", URL, NOW + 200, "other").to_string());
    assert!(v
        .verify(
            &format!("{}.{}.{}", parts[0], evil, parts[2]),
            "c1",
            Some(&keys),
            NOW
        )
        .is_err());
    // alg none / HS256 with the public key as secret.
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        parts[1]
    );
    assert!(v.verify(&none, "c1", Some(&keys), NOW).is_err());
    let hs = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims("c1", URL, NOW + 60, "j"),
        &EncodingKey::from_secret(g.jwks.as_bytes()),
    )
    .unwrap();
    assert!(v.verify(&hs, "c1", Some(&keys), NOW).is_err());
    assert!(v.verify("garbage", "c1", Some(&keys), NOW).is_err());
    assert!(v
        .verify(&"a.".repeat(5000), "c1", Some(&keys), NOW)
        .is_err());
}

#[test]
fn exp_more_than_five_minutes_ahead_is_refused() {
    let v = Verifier::new(URL).unwrap();
    let (k, jwks) = rsa_key();
    let keys = parse_jwks(&jwks).unwrap();
    let mut h = Header::new(Algorithm::RS384);
    h.kid = Some("r1".into());
    let ok = jsonwebtoken::encode(&h, &claims("c1", URL, NOW + 290, "j1"), &k).unwrap();
    assert!(v.verify(&ok, "c1", Some(&keys), NOW).is_ok(), "RS384 works");
    let long = jsonwebtoken::encode(&h, &claims("c1", URL, NOW + 3600, "j2"), &k).unwrap();
    assert!(v.verify(&long, "c1", Some(&keys), NOW).is_err());
    let no_jti = jsonwebtoken::encode(
        &h,
        &json!({"iss":"c1","sub":"c1","aud":URL,"exp":NOW+60}),
        &k,
    )
    .unwrap();
    assert!(v.verify(&no_jti, "c1", Some(&keys), NOW).is_err());
    let sub = jsonwebtoken::encode(
        &h,
        &json!({"iss":"c1","sub":"c2","aud":URL,"exp":NOW+60,"jti":"x"}),
        &k,
    )
    .unwrap();
    assert!(v.verify(&sub, "c1", Some(&keys), NOW).is_err());
    // RS256 is not accepted even with a valid key.
    let mut h256 = Header::new(Algorithm::RS256);
    h256.kid = Some("r1".into());
    let rs256 = jsonwebtoken::encode(&h256, &claims("c1", URL, NOW + 60, "j3"), &k).unwrap();
    assert!(v.verify(&rs256, "c1", Some(&keys), NOW).is_err());
    // Unknown kid.
    let mut hk = Header::new(Algorithm::RS384);
    hk.kid = Some("nope".into());
    let bad_kid = jsonwebtoken::encode(&hk, &claims("c1", URL, NOW + 60, "j4"), &k).unwrap();
    assert!(v.verify(&bad_kid, "c1", Some(&keys), NOW).is_err());
}

#[test]
fn jwks_registration_is_vetted() {
    assert!(parse_jwks("not json").is_err());
    assert!(parse_jwks(r#"{"keys":[]}"#).is_err());
    assert!(parse_jwks(r#"{"keys":[{"kty":"oct","k":"AAAA"}]}"#).is_err());
    let g = client_key::generate().unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&g.jwks).unwrap();
    v["keys"][0]["d"] = json!("AAAA");
    let e = parse_jwks(&v.to_string()).unwrap_err().to_string();
    assert!(e.contains("private"), "{e}");
    let mut v: serde_json::Value = serde_json::from_str(&g.jwks).unwrap();
    v["keys"][0]["use"] = json!("enc");
    assert!(parse_jwks(&v.to_string()).is_err());
    let small =
        json!({"keys":[{"kty":"RSA","n": URL_SAFE_NO_PAD.encode([0xffu8; 128]), "e":"AQAB"}]});
    assert!(parse_jwks(&small.to_string())
        .unwrap_err()
        .to_string()
        .contains("2048"));
    assert!(parse_jwks(&g.jwks).is_ok());
}
