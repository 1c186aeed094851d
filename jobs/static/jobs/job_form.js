/* The job form: an empty parameters box starts with an example for the chosen job type. */
"use strict";
(function () {
  function setUp() {
    var type = document.getElementById("id_job_type");
    var box = document.getElementById("id_parameters");
    if (!type || !box || !box.dataset.examples) {
      return;
    }
    var examples = JSON.parse(box.dataset.examples);
    var shown = null; // the example this script last put in the box
    function untouched() {
      var text = box.value.trim();
      return text === "" || text === "null" || text === "{}" || text === shown;
    }
    function fill() {
      var example = examples[type.value];
      if (example && untouched()) {
        shown = JSON.stringify(example, null, 2);
        box.value = shown;
      }
    }
    type.addEventListener("change", fill);
    fill();
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", setUp);
  } else {
    setUp();
  }
})();
