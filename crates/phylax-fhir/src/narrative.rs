//! The XHTML of a narrative (`Narrative.div`), parsed as the XML it must
//! be and checked against FHIR R4's rules (§2.4 Narrative, constraints
//! txt-1 and txt-2's allow-list): a `div` root in the XHTML namespace;
//! only the basic formatting, list, table, link and image elements of
//! HTML 4; their plain attributes; no script, event handler, form, frame,
//! object, `base`/`link`/`head`/`body`, document type or processing
//! instruction. URLs (`href`, `src`) are read after entity decoding and
//! with the whitespace and control characters browsers skip removed, so
//! `jav&#x61;script:` and `java\tscript:` are the `javascript:` they are;
//! only relative URLs, fragments, `http`, `https`, `mailto`, `tel` (and
//! `data:image/…` for images) pass. Inline `style` may not load anything
//! (`url(`, `@import`, `expression(`, `behavior`).
//!
//! Anything else is refused (the resource is not stored): a narrative is
//! never rewritten, so what a client sent is what it gets back.

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

/// Elements a narrative may hold.
const ELEMENTS: &[&str] = &[
    "div",
    "p",
    "br",
    "hr",
    "span",
    "b",
    "i",
    "u",
    "s",
    "em",
    "strong",
    "small",
    "big",
    "sub",
    "sup",
    "tt",
    "code",
    "pre",
    "blockquote",
    "q",
    "cite",
    "abbr",
    "acronym",
    "dfn",
    "kbd",
    "samp",
    "var",
    "del",
    "ins",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "ul",
    "ol",
    "li",
    "dl",
    "dt",
    "dd",
    "table",
    "caption",
    "thead",
    "tbody",
    "tfoot",
    "tr",
    "th",
    "td",
    "col",
    "colgroup",
    "a",
    "img",
    "address",
    "bdo",
];

/// Attributes a narrative's elements may carry.
const ATTRIBUTES: &[&str] = &[
    "id",
    "class",
    "style",
    "title",
    "lang",
    "xml:lang",
    "dir",
    "href",
    "name",
    "src",
    "alt",
    "width",
    "height",
    "border",
    "align",
    "valign",
    "colspan",
    "rowspan",
    "cellpadding",
    "cellspacing",
    "summary",
    "span",
    "abbr",
    "scope",
    "headers",
    "char",
    "charoff",
    "cite",
    "datetime",
    "start",
    "type",
    "value",
];

const XHTML_NS: &str = "http://www.w3.org/1999/xhtml";

/// Why a narrative was refused (fixed text: never echoes the content).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NarrativeError {
    #[error("narrative is not well-formed XHTML")]
    Malformed,
    #[error("narrative must be a single <div> in the XHTML namespace")]
    Root,
    #[error("narrative holds an element that is not allowed (scripts, forms, frames, objects, document parts)")]
    Element,
    #[error("narrative holds an attribute that is not allowed (event handlers and the like)")]
    Attribute,
    #[error("narrative holds a URL that is not allowed (only relative, http, https, mailto, tel, and data: images)")]
    Url,
    #[error("narrative holds a style that loads content")]
    Style,
}

/// Check a narrative's XHTML.
pub fn check(xhtml: &str) -> Result<(), NarrativeError> {
    let mut reader = Reader::from_str(xhtml);
    let mut depth = 0usize;
    let mut roots = 0usize;
    loop {
        let event = reader.read_event().map_err(|_| NarrativeError::Malformed)?;
        match event {
            Event::Start(e) => {
                element(&e, depth == 0)?;
                if depth == 0 {
                    roots += 1;
                }
                depth += 1;
            }
            Event::Empty(e) => {
                element(&e, depth == 0)?;
                if depth == 0 {
                    roots += 1;
                }
            }
            Event::End(_) => depth = depth.saturating_sub(1),
            Event::Text(t) => {
                if depth == 0 && !t.chars().all(char::is_whitespace) {
                    return Err(NarrativeError::Root);
                }
            }
            Event::CData(_) | Event::Comment(_) => {
                if depth == 0 {
                    return Err(NarrativeError::Root);
                }
            }
            Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {
                return Err(NarrativeError::Element)
            }
            Event::GeneralRef(_) => {
                if depth == 0 {
                    return Err(NarrativeError::Root);
                }
            }
            Event::Eof => break,
        }
    }
    if roots != 1 || depth != 0 {
        return Err(NarrativeError::Root);
    }
    Ok(())
}

fn element(e: &BytesStart<'_>, root: bool) -> Result<(), NarrativeError> {
    let name = e.name().as_ref().to_ascii_lowercase();
    if root && name != "div" {
        return Err(NarrativeError::Root);
    }
    if !ELEMENTS.contains(&name.as_str()) {
        return Err(NarrativeError::Element);
    }
    for a in e.attributes() {
        let a = a.map_err(|_| NarrativeError::Malformed)?;
        let key = a.key.as_ref().to_ascii_lowercase();
        let value = a
            .normalized_value(quick_xml::XmlVersion::Implicit1_0)
            .map_err(|_| NarrativeError::Malformed)?;
        if key == "xmlns" {
            if !root || value != XHTML_NS {
                return Err(NarrativeError::Root);
            }
            continue;
        }
        if !ATTRIBUTES.contains(&key.as_str()) {
            return Err(NarrativeError::Attribute);
        }
        match key.as_str() {
            "href" | "cite" => url_ok(&value, false)?,
            "src" => url_ok(&value, name == "img")?,
            "style" => style_ok(&value)?,
            _ => {}
        }
    }
    Ok(())
}

/// What a browser reads as the URL's scheme: whitespace and control
/// characters are skipped, case is ignored.
fn squeezed(v: &str) -> String {
    v.chars()
        .filter(|c| !c.is_whitespace() && !c.is_control())
        .flat_map(char::to_lowercase)
        .collect()
}

fn url_ok(v: &str, image: bool) -> Result<(), NarrativeError> {
    let u = squeezed(v);
    let scheme = match u.find(':') {
        // A colon after the first '/', '?' or '#' is not a scheme's.
        Some(i) if !u[..i].contains(['/', '?', '#']) => &u[..i],
        _ => return Ok(()),
    };
    let ok = matches!(scheme, "http" | "https" | "mailto" | "tel")
        || (image
            && scheme == "data"
            && u.starts_with("data:image/")
            && !u.starts_with("data:image/svg"));
    if ok {
        Ok(())
    } else {
        Err(NarrativeError::Url)
    }
}

fn style_ok(v: &str) -> Result<(), NarrativeError> {
    let s = squeezed(v);
    // A backslash starts a CSS escape (`\75rl(` is `url(`): refused rather
    // than decoded.
    if [
        "url(",
        "image-set(",
        "image(",
        "@import",
        "expression(",
        "behavior",
        "javascript:",
        "-moz-binding",
        "\\",
    ]
    .iter()
    .any(|bad| s.contains(bad))
    {
        Err(NarrativeError::Style)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "xmlns=\"http://www.w3.org/1999/xhtml\"";

    #[test]
    fn ordinary_narratives_pass() {
        for ok in [
            format!("<div {NS}>Ida <b>Smith</b>, born 1961</div>"),
            "<div>plain</div>".to_owned(),
            format!("<div {NS}><table border=\"1\"><tr><td colspan=\"2\">x</td></tr></table><br/></div>"),
            format!("<div {NS}><a href=\"https://example.org/x?a=1&amp;b=2\">link</a> <a href=\"#frag\">f</a> <a href=\"Patient/1\">p</a></div>"),
            format!("<div {NS}><img src=\"data:image/png;base64,AAAA\" alt=\"x\"/><span style=\"color: red\">r</span><!-- note --></div>"),
            format!("<div {NS}><p>a &lt;script&gt; in text is text</p></div>"),
        ] {
            assert_eq!(check(&ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn active_content_is_refused_however_it_is_spelled() {
        for (bad, why) in [
            (
                "<div><script>alert(1)</script></div>",
                NarrativeError::Element,
            ),
            (
                "<div><img src=\"x\"onerror=\"alert(1)\"/></div>",
                NarrativeError::Attribute,
            ),
            (
                "<div><img src=\"x\" onerror=\"alert(1)\"/></div>",
                NarrativeError::Attribute,
            ),
            (
                "<div><IMG SRC=\"x\" OnError=\"alert(1)\"/></div>",
                NarrativeError::Attribute,
            ),
            (
                "<div><a href=\"jav&#x61;script:alert(1)\">a</a></div>",
                NarrativeError::Url,
            ),
            (
                "<div><a href=\"java&#x09;script:alert(1)\">a</a></div>",
                NarrativeError::Url,
            ),
            (
                "<div><a href=\" JavaScript:alert(1)\">a</a></div>",
                NarrativeError::Url,
            ),
            (
                "<div><a href=\"vbscript:x\">a</a></div>",
                NarrativeError::Url,
            ),
            (
                "<div><a href=\"data:text/html,x\">a</a></div>",
                NarrativeError::Url,
            ),
            (
                "<div><img src=\"data:image/svg+xml,x\"/></div>",
                NarrativeError::Url,
            ),
            (
                "<div><span style=\"background:url(https://evil/x)\">s</span></div>",
                NarrativeError::Style,
            ),
            (
                "<div><span style=\"x:expression(alert(1))\">s</span></div>",
                NarrativeError::Style,
            ),
            (
                "<div><span style=\"background:\\75rl(https://evil/x)\">s</span></div>",
                NarrativeError::Style,
            ),
            (
                "<div><span style=\"background-image:image-set('https://evil/x' 1x)\">s</span></div>",
                NarrativeError::Style,
            ),
            (
                "<div><iframe src=\"https://x\"></iframe></div>",
                NarrativeError::Element,
            ),
            ("<div><form><input/></form></div>", NarrativeError::Element),
            (
                "<div><object data=\"x\"></object></div>",
                NarrativeError::Element,
            ),
            (
                "<div><svg onload=\"x\"></svg></div>",
                NarrativeError::Element,
            ),
            ("<div><body>x</body></div>", NarrativeError::Element),
            ("<p>not a div</p>", NarrativeError::Root),
            ("<div>a</div><div>b</div>", NarrativeError::Root),
            ("text<div>a</div>", NarrativeError::Root),
            ("<div xmlns=\"http://evil\">a</div>", NarrativeError::Root),
            ("<div><p>unclosed</div>", NarrativeError::Malformed),
            ("<!DOCTYPE x><div>a</div>", NarrativeError::Element),
            (
                "<?xml-stylesheet href=\"x\"?><div>a</div>",
                NarrativeError::Element,
            ),
            (
                "<div><a href=\"&unknown;\">a</a></div>",
                NarrativeError::Malformed,
            ),
        ] {
            assert_eq!(check(bad), Err(why), "{bad}");
        }
    }
}
