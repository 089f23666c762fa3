// Typesets the pages' math with the bundled KaTeX (no network): arithmatex wraps inline math in
// \( \) and display math in \[ \]; rendered again on every page load of the instant navigation.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\[", right: "\\]", display: true },
      { left: "\\(", right: "\\)", display: false },
    ],
    throwOnError: false,
  });
});
