// A library that is not a graft plugin at all.
extern "C" __attribute__((visibility("default"))) int not_a_plugin() { return 42; }
