# cmake --install: the CLI, the core library and its public headers, the plugins, and a CMake
# package so that an out-of-tree plugin needs only find_package(graft) and graft_add_plugin().
include(CMakePackageConfigHelpers)

set_target_properties(graft_core PROPERTIES EXPORT_NAME core)
set_target_properties(graft_torch PROPERTIES EXPORT_NAME torch)
install(TARGETS graft_core graft_torch EXPORT graftTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS graft RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/core/include/graft DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}
  FILES_MATCHING PATTERN "*.h")
install(FILES ${PROJECT_BINARY_DIR}/core/include/graft/version.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/graft)

set(GRAFT_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/graft)
install(EXPORT graftTargets NAMESPACE graft:: DESTINATION ${GRAFT_CMAKE_DIR})
set(GRAFT_PLUGIN_INSTALL_REL ${CMAKE_INSTALL_LIBDIR}/graft/plugins)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/graftConfig.cmake.in
  ${PROJECT_BINARY_DIR}/graftConfig.cmake
  INSTALL_DESTINATION ${GRAFT_CMAKE_DIR}
  PATH_VARS GRAFT_PLUGIN_INSTALL_REL)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/graftConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/graftConfig.cmake ${PROJECT_BINARY_DIR}/graftConfigVersion.cmake
  ${PROJECT_SOURCE_DIR}/cmake/GraftPlugin.cmake DESTINATION ${GRAFT_CMAKE_DIR})

# The shipped recipes and their building blocks, for `graft ls` and `graft cp`.
install(DIRECTORY ${PROJECT_SOURCE_DIR}/recipes ${PROJECT_SOURCE_DIR}/configs
  DESTINATION ${CMAKE_INSTALL_DATADIR}/graft)
