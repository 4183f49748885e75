// Placeholder: the connector core bindings live here (the lead replaces this file).
#include <nanobind/nanobind.h>

void BindConnector(nanobind::module_&) {}
