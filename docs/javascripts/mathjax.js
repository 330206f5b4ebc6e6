// MathJax for pymdownx.arithmatex (generic mode). MathJax itself ships with the site
// (assets/mathjax/, copied by docs/hooks/offline.py), so pages render their math offline.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// The theme's document$ emits on every page load (each one, with instant navigation).
// MathJax's startup typesets the first page; later pages are typeset once it is ready.
// No output.clearCache(): it drops the CHTML glyph styles, and the math turns invisible.
document$.subscribe(() => {
  const startup = window.MathJax.startup;
  if (!startup || !startup.promise) return;  // not loaded yet: its startup will typeset this page
  startup.promise = startup.promise.then(() => {
    MathJax.typesetClear();
    MathJax.texReset();
    return MathJax.typesetPromise();
  });
});
