# graft_add_plugin(NAME SOURCES file...): one PEFT method plugin, libgraft_<NAME>.so.
#
# Used inside graft's tree and, through find_package(graft), by plugins built outside it. The
# library is a MODULE (loaded, never linked), built with hidden visibility so that it exports
# only its GRAFT_PLUGIN descriptor, and linked to graft::core and libtorch as shared libraries.
function(graft_add_plugin name)
  cmake_parse_arguments(ARG "" "" "SOURCES" ${ARGN})
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "graft_add_plugin(${name}): no SOURCES given")
  endif()
  set(target graft_plugin_${name})
  add_library(${target} MODULE ${ARG_SOURCES})
  set_target_properties(${target} PROPERTIES
    OUTPUT_NAME graft_${name}
    PREFIX lib
    CXX_VISIBILITY_PRESET hidden
    VISIBILITY_INLINES_HIDDEN ON
    CXX_STANDARD 17
    CXX_STANDARD_REQUIRED ON)
  target_link_libraries(${target} PRIVATE graft::core)
  if(TARGET graft_core)
    # In graft's own tree: next to the other plugins, with the house warnings and the shared
    # precompiled header, and installed with graft.
    set_target_properties(${target} PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${GRAFT_BUILD_PLUGIN_DIR})
    target_link_libraries(${target} PRIVATE graft_warnings)
    target_precompile_headers(${target} REUSE_FROM graft_core)
    set_target_properties(${target} PROPERTIES INSTALL_RPATH "$ORIGIN/../..")
    install(TARGETS ${target} LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}/graft/plugins)
    set_property(GLOBAL APPEND PROPERTY GRAFT_PLUGIN_TARGETS ${target})
  endif()
endfunction()
